"""Per-type bookkeeping shared by both protocols: what came from upstream, what went down, and
how Envoy answered. It feeds the debug endpoint, and the streams read their nonces and whether
Envoy accepted its last push from it rather than keeping them twice."""

from dataclasses import dataclass


@dataclass(slots=True)
class TypeStatus:
    upstream_version: str = ""
    upstream_nonce: str = ""
    upstream_resources: int = 0
    upstream_bytes: int = 0
    pushed_version: str = ""
    pushed_nonce: str = ""
    pushed_resources: int = 0
    pushed_bytes: int = 0
    acked_version: str = ""
    acked_nonce: str = ""
    last_nack: str = ""
    nack_count: int = 0

    @property
    def accepted(self) -> bool:
        """Envoy ACKed the newest response it was sent."""
        return bool(self.pushed_nonce) and self.acked_nonce == self.pushed_nonce

    @property
    def state(self) -> str:
        """SYNCED, STALE, NACK or NOT SENT, in the sense of `istioctl proxy-status`."""
        if not self.pushed_nonce:
            return "NOT SENT"
        if self.last_nack and self.acked_nonce != self.pushed_nonce:
            return "NACK"
        if self.pushed_nonce and self.acked_nonce != self.pushed_nonce:
            return "STALE"
        return "SYNCED"
