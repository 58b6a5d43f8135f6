"""Real Envoy 1.40 end to end, xdsproxy in-process or as a child process: assertions on
Envoy's admin endpoint and on traffic through it."""
