"""Istio-aware scoping, pure: which part of the upstream view each workload gets."""
