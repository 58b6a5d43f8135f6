"""Child processes: `xdsproxy serve`, `kubectl` rendering the manifests, the load
generator."""
