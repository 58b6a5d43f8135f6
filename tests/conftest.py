"""Shared test helpers live in `xdsproxy.harness` (the benchmarks and the demo use them too)."""

from xdsproxy.harness.stack import eventually, running_envoy, running_proxy, running_sim

__all__ = ["eventually", "running_envoy", "running_proxy", "running_sim"]
