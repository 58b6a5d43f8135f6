"""Durable dependency sets: learned edges with first and last seen, per workload."""
