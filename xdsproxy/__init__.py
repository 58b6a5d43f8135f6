"""xdsproxy: a lazy-loading xDS proxy for Istio sidecars."""

__version__ = "0.1.0"
