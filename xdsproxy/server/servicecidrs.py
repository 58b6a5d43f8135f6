"""The cluster's service address ranges from the Kubernetes ServiceCIDR API
(networking.k8s.io/v1, GA in Kubernetes 1.33), for compact mode's mesh ranges.

Read once at start with the official client: the ranges must not change while xdsproxy runs
(see scope/compact.py). Needs `list` on servicecidrs, which `deploy/base/rbac.yaml` grants.
On an older cluster (404) or without the permission, nothing: compact mode then uses
--service-cidr or, where asked for, ranges derived from the VIPs.
"""

import logging
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from xdsproxy.store.kubernetes import api_client

log = logging.getLogger("xdsproxy.servicecidrs")


def service_cidrs(api: Any = None) -> tuple[str, ...]:
    try:
        listed = client.NetworkingV1Api(api or api_client()).list_service_cidr()
    except (ApiException, HTTPError, OSError, config.ConfigException) as exc:
        status = getattr(exc, "status", None)
        log.warning(
            "cannot read the Kubernetes ServiceCIDR objects (%s); give the service ranges "
            "with --service-cidr",
            f"HTTP {status}" if status else exc,
        )
        return ()
    return tuple(cidr for item in listed.items for cidr in (item.spec.cidrs or ()))
