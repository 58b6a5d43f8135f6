"""Every process-wide cache is listed in `xdsproxy.caches` with its bound, and one call empties
them all."""

import importlib
import pkgutil
import re
from pathlib import Path

import xdsproxy
from xdsproxy import caches
from xdsproxy.istio.names import outbound_cluster
from xdsproxy.scope.tunnel import placeholder_cluster


def _import_everything() -> None:
    for module in pkgutil.walk_packages(xdsproxy.__path__, "xdsproxy."):
        if not module.name.startswith(("xdsproxy.harness", "xdsproxy.demo")):
            importlib.import_module(module.name)


def test_every_listed_cache_is_in_use_and_every_cache_is_listed() -> None:
    _import_everything()
    assert caches.registered() == set(caches.CACHES)


def test_clear_empties_every_cache() -> None:
    name = "outbound|80||a.ns.svc.cluster.local"
    service, _ = outbound_cluster(name)
    placeholder_cluster(name, service)
    assert outbound_cluster.cache_info().currsize > 0
    assert placeholder_cluster.cache_info().currsize > 0
    caches.clear()
    assert outbound_cluster.cache_info().currsize == 0
    assert placeholder_cluster.cache_info().currsize == 0


def test_no_module_keeps_a_cache_of_its_own() -> None:
    """A new process-wide cache goes through `xdsproxy.caches`, so it is listed with its bound.
    Allowed: caches one object holds (they go with it), and loading the protobuf registry once."""
    root = Path(xdsproxy.__file__).parent
    allowed = {
        "server/lazy.py": 1,  # a runtime's: nodes that NACKed the tunnel
        "learn/learner.py": 1,  # a learner's: why edges left a scope
        "xds/shared.py": 1,  # a Transitions object's own memo (tests make their own)
        "wire/registry.py": 1,  # load the Envoy descriptors once
    }
    found: dict[str, int] = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root).as_posix()
        if relative == "caches.py" or relative.startswith("harness/"):
            continue
        count = len(re.findall(r"lru_cache\(|LRUCache\(|^@cache\b", path.read_text(), re.M))
        if count:
            found[relative] = count
    assert found == allowed
