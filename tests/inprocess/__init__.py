"""In-process servers on loopback: real gRPC (the ADS proxy, the ALS endpoint, the simulated
Istiod), HTTP (the debug endpoint, the Kubernetes API stand-in) and TLS."""
