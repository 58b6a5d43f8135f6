"""Running real Envoy processes for the demo, the tests and the benchmarks."""
