"""Every Envoy message type in xds-protos, imported once, so JSON views can decode `Any`s."""

import importlib
import pkgutil
from functools import cache


@cache
def load_envoy_types() -> None:
    import envoy
    import udpa
    import xds

    for package in (envoy, xds, udpa):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if module.name.endswith("_pb2"):
                importlib.import_module(module.name)
