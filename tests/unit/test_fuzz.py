"""Hostile input to the parsers (hypothesis): nothing but the documented error escapes."""

import contextlib

from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.xds_messages import receive_upstream
from xdsproxy.istio.names import ServicePort
from xdsproxy.learn.attribution import AccessRecord, attribute
from xdsproxy.learn.records import records
from xdsproxy.model import WorkloadKey
from xdsproxy.scope.contract import METADATA_NAMESPACE
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import ProtocolError, UpstreamProtocolError
from xdsproxy.xds.sotw import SotwStream


class Directory:
    def workloads_at(self, ip):
        return frozenset({WorkloadKey("ns", "w")}) if ip == "10.0.0.1" else frozenset()

    def service_accounts(self, workload):
        return frozenset()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_als_bytes(data: bytes) -> None:
    try:
        message = StreamAccessLogsMessage.FromString(data)
    except DecodeError:
        return
    for record, _ in records(message):
        attribute(record, Directory(), lambda service: True)


_text = st.text(max_size=80)


@settings(max_examples=300, deadline=None)
@given(_text, _text, _text, _text, _text, _text, st.sampled_from(["10.0.0.1", "10.0.0.2", ""]))
def test_als_fields(cluster, authority, claim_ns, claim_w, port, san, ip) -> None:
    message = StreamAccessLogsMessage()
    common = message.http_logs.log_entry.add().common_properties
    common.upstream_cluster = cluster
    common.downstream_direct_remote_address.socket_address.address = ip
    common.tls_properties.peer_certificate_properties.subject_alt_name.add().uri = san
    common.metadata.filter_metadata[METADATA_NAMESPACE].update(
        {
            "x-xdsproxy-source-namespace": claim_ns,
            "x-xdsproxy-source-workload": claim_w,
            "x-xdsproxy-original-port": port,
        }
    )
    message.http_logs.log_entry[0].request.authority = authority
    for record, _ in records(message):
        attribute(record, Directory(), lambda service: True)


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        AccessRecord,
        remote_ip=_text,
        claimed_namespace=_text,
        claimed_workload=_text,
        upstream_cluster=_text,
        authority=_text,
        original_port=_text,
    )
)
def test_attribution_never_credits_an_unknown_ip_without_proof(record: AccessRecord) -> None:
    result = attribute(record, Directory(), lambda service: isinstance(service, ServicePort))
    workload = getattr(result, "workload", None)
    if workload is not None:
        assert record.remote_ip == "10.0.0.1" and workload == WorkloadKey("ns", "w")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_streams_raise_only_protocol_errors(messages: list[bytes]) -> None:
    for stream in (SotwStream(), DeltaStream()):
        for data in messages:
            with contextlib.suppress(ProtocolError):
                stream.receive_downstream(data)
            with contextlib.suppress(UpstreamProtocolError):
                receive_upstream(stream, data)
