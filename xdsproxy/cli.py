"""Command line: `xdsproxy serve`, `status`, `sim` and `demo`."""

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

from xdsproxy import logs

log = logging.getLogger("xdsproxy")


class _Parser(argparse.ArgumentParser):
    """Usage errors as `logs.say` writes them: one JSON line with `--log-format json`."""

    def error(self, message: str) -> NoReturn:
        if logs.format_in(sys.argv[1:]) != "json":
            super().error(message)
        logs.configure("info", "json")
        logs.say(f"{self.prog}: {message}")
        sys.exit(2)


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each flag's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if (
            default is None
            or default is False
            or default in ("", [])
            or default is argparse.SUPPRESS
        ):
            return action.help or ""
        return super()._get_help_string(action)


def _serve_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        help="run the proxy between sidecars and Istiod",
        parents=[common],
        formatter_class=_DefaultsShown,
    )
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="Istiod's xDS address")
    tls = p.add_mutually_exclusive_group(required=True)
    tls.add_argument("--upstream-plaintext", action="store_true", help="dial Istiod without TLS")
    tls.add_argument("--upstream-ca", type=Path, metavar="FILE", help="root CA to verify Istiod")
    p.add_argument("--upstream-sni", default="", metavar="NAME", help="TLS name to verify")
    p.add_argument(
        "--upstream-connections",
        type=_bounded(int, 0, None),
        default=0,
        metavar="N",
        help="multiplex the sidecars' upstream streams over N connections to Istiod "
        "(0: a connection per sidecar)",
    )
    p.add_argument(
        "--listen",
        default="0.0.0.0:15010",
        metavar="HOST:PORT",
        help="where sidecars connect; TLS when --cert/--key are given without --listen-tls",
    )
    p.add_argument(
        "--listen-tls",
        default="",
        metavar="HOST:PORT",
        help="a second listener, with TLS (--cert/--key), beside a plaintext --listen",
    )
    p.add_argument("--cert", type=Path, metavar="FILE", help="serving certificate (with --key)")
    p.add_argument("--key", type=Path, metavar="FILE")
    p.add_argument("--mode", choices=("lazy", "passthrough"), default="passthrough")
    p.add_argument(
        "--egress",
        default="",
        metavar="FQDN:PORT",
        help="the lazy egress service, e.g. lazy-egress.istio-system.svc.cluster.local:80",
    )
    p.add_argument(
        "--egress-port",
        type=_bounded(int, 1, 65535),
        default=15081,
        help="port of the listener synthesized on the egress",
    )
    p.add_argument(
        "--egress-bind",
        default="0.0.0.0",
        metavar="ADDRESS",
        help="address the egress listener binds",
    )
    p.add_argument(
        "--egress-plaintext",
        action="store_true",
        help="no Istio mTLS on the egress listener (only where no Istio agent serves SDS)",
    )
    p.add_argument(
        "--als-listen",
        default="0.0.0.0:15020",
        metavar="HOST:PORT",
        help="the ALS endpoint the egress streams access logs to",
    )
    p.add_argument(
        "--als-advertise",
        default="xdsproxy.istio-system.svc:15020",
        metavar="HOST:PORT",
        help="how the egress reaches the ALS endpoint",
    )
    p.add_argument(
        "--als-allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="networks allowed to stream access logs besides connected egress nodes",
    )
    p.add_argument("--rules", type=Path, metavar="FILE", help="static scope rules (YAML)")
    p.add_argument(
        "--lazy-tcp",
        choices=("auto", "placeholders", "compact"),
        default="auto",
        help="out-of-scope TCP services: keep Istio's listener with a placeholder cluster "
        "each, or neither, the mesh's service ranges tunnelled to the egress; auto: compact "
        "once the ranges are known (--service-cidr, or the ServiceCIDR API with the "
        "Kubernetes store; see docs/lazy.md)",
    )
    p.add_argument(
        "--lazy-sniffed",
        choices=("placeholders", "compact"),
        default="placeholders",
        help="the same for protocol-sniffed ports (compact: first-contact HTTP is tunnelled at "
        "L4 where no HTTP listener of its port exists)",
    )
    p.add_argument(
        "--service-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="the mesh's service address range, for compact mode (repeatable; default: the "
        "ServiceCIDR API with the Kubernetes store, else derived from the VIPs if compact "
        "mode is asked for)",
    )
    p.add_argument(
        "--debug-listen",
        default="127.0.0.1:15014",
        metavar="HOST:PORT",
        help="health, readiness and metrics only (loopback unless set otherwise; the "
        "Deployment exposes it for the kubelet and Prometheus)",
    )
    p.add_argument(
        "--admin-listen",
        default="127.0.0.1:15015",
        metavar="HOST:PORT",
        help="those plus every sidecar's status and config, read by `xdsproxy status`; keep "
        "it on loopback (kubectl port-forward reaches it), or '' for none",
    )
    p.add_argument(
        "--admin-writes",
        action="store_true",
        help="serve `xdsproxy scope add|forget` on --admin-listen (off by default; loopback only)",
    )
    p.add_argument(
        "--store",
        default="sqlite:///var/lib/xdsproxy/edges.db",
        metavar="URL",
        help="where learned dependencies live: sqlite:///PATH, kubernetes://NAMESPACE, "
        "or memory://",
    )
    p.add_argument(
        "--ttl",
        type=_duration,
        default="168h",
        metavar="DURATION",
        help="drop a learned dependency unused this long (0: never)",
    )
    p.add_argument(
        "--usage-sample",
        type=_bounded(float, 0.0, 100.0),
        default=1.0,
        metavar="PERCENT",
        help="share of a sidecar's direct requests logged to refresh last seen "
        "(0 turns usage logging off)",
    )
    p.add_argument(
        "--flush-interval",
        type=_duration,
        default="10s",
        metavar="DURATION",
        help="how often last-seen updates are written in batch",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=-1,
        help="largest gRPC message accepted or sent; -1 for no limit",
    )
    p.add_argument(
        "--fail-open",
        choices=("never", "auto"),
        default="never",
        help="auto: serve scoped sidecars Istio's full config while the egress has no ready "
        "endpoint (see docs/operations.md before turning it on)",
    )
    p.add_argument(
        "--fail-open-hold-down",
        type=_duration,
        default="60s",
        metavar="DURATION",
        help="how long the egress must be ready again before sidecars are scoped again",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate every flag, file and URL, then exit (0 when all hold) without serving",
    )
    p.add_argument(
        "--max-pending-bytes",
        type=int,
        default=128 * 1024 * 1024,
        help="bytes queued for one slow sidecar before its stream is closed",
    )


def _bounded(kind: type, low: float | None, high: float | None):
    """An argparse type: a number of `kind` within [low, high] (None: unbounded)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"{low if low is not None else '-inf'} to {high if high is not None else 'inf'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _duration(text: str) -> float:
    """`90s`, `30m`, `168h`, `1h30m`, or plain seconds."""
    import re

    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m or 168h")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(value) * scale[unit] for value, unit in parts)


def _sim_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "sim", help="run the simulated Istiod (a stand-in for tests and demos)", parents=[common]
    )
    p.add_argument("--services", type=int, default=100)
    p.add_argument("--namespaces", type=int, default=None)
    p.add_argument("--listen", default="127.0.0.1:15010", metavar="HOST:PORT")
    p.add_argument(
        "--profile",
        choices=("named-ports", "realistic"),
        default="named-ports",
        help="named-ports: HTTP and TCP ports only; realistic: the protocol mix of a real "
        "mesh (6 in 10 protocol-sniffed, 3 TCP, 1 HTTP)",
    )
    p.add_argument(
        "--registry-only",
        action="store_true",
        help="outboundTrafficPolicy REGISTRY_ONLY: the catch-all vhost is block_all",
    )
    p.add_argument(
        "--bind-listeners",
        default=None,
        metavar="ADDRESS",
        help="bind virtualOutbound/virtualInbound here (default: bind nothing)",
    )


def _replica_flags() -> argparse.ArgumentParser:
    """How the read and write commands find xdsproxy's replicas."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--debug",
        action="append",
        default=[],
        metavar="ADDR",
        help="a replica's admin endpoint (--admin-listen), HOST:PORT or URL; repeatable "
        "(default 127.0.0.1:15015)",
    )
    flags.add_argument(
        "--service",
        default="",
        metavar="NS/NAME",
        help="find the replicas from this Service's EndpointSlices (kubeconfig or in-cluster)",
    )
    flags.add_argument(
        "--admin-port",
        type=_bounded(int, 1, 65535),
        default=15015,
        help="with --service: the admin port where the EndpointSlices name no http-admin port",
    )
    return flags


def _status_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "status",
        help="every sidecar's sync state across replicas, like istioctl proxy-status",
        parents=[common, _replica_flags()],
    )
    p.add_argument("name", nargs="?", help="one sidecar, by pod.namespace, pod name or node id")
    p.add_argument("--json", action="store_true", help="the raw JSON")


def _config_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "config",
        help="what a sidecar was pushed, like istioctl proxy-config",
        parents=[common, _replica_flags()],
    )
    p.add_argument("kind", choices=("clusters", "listeners", "routes", "endpoints"))
    p.add_argument(
        "name", help="a sidecar (pod.namespace, pod name, node id) or NAMESPACE/WORKLOAD"
    )
    p.add_argument("--fqdn", default="", help="only this service host")
    p.add_argument("--diff", action="store_true", help="what differs from what Istiod sent")


def _scope_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "scope", help="explain, add, forget or export workloads' scopes", parents=[common]
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    workload = "NAMESPACE/WORKLOAD, or a sidecar of it (pod.namespace, pod name)"
    why = verbs.add_parser(
        "why", help="why a service is or is not in scope", parents=[common, _replica_flags()]
    )
    why.add_argument("name", help=workload)
    why.add_argument("host", metavar="SERVICE", help="HOST[:PORT]")
    why.add_argument("--json", action="store_true", help="every replica's raw answer")
    for verb, says in (
        ("add", "put a dependency in scope on every replica (needs --admin-writes)"),
        ("forget", "drop a learned dependency on every replica (needs --admin-writes)"),
    ):
        write = verbs.add_parser(verb, help=says, parents=[common, _replica_flags()])
        write.add_argument("name", help=workload)
        write.add_argument(
            "host", metavar="SERVICE", help="HOST[:PORT] (every port of HOST without one)"
        )
    export = verbs.add_parser(
        "export",
        help="Istio Sidecar resources (networking.istio.io/v1) of the current scopes",
        parents=[common, _replica_flags()],
    )
    export.add_argument("name", nargs="?", help=workload + "; every workload without it")


def _admin_urls(args: argparse.Namespace) -> list[str]:
    from xdsproxy.debug.status import admin_url, replicas_from_service

    urls = [admin_url(a) for a in args.debug]
    if args.service:
        urls += replicas_from_service(args.service, args.admin_port)
    return urls or [admin_url("127.0.0.1:15015")]


def _demo_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", help="what lazy loading saves, end to end with real Envoys", parents=[common]
    )
    p.add_argument("--services", type=int, default=2000, help="mesh size (default 2000)")
    p.add_argument(
        "--calls",
        type=int,
        default=6,
        help="services the workload calls (a third each HTTP, protocol-sniffed and TCP)",
    )
    p.add_argument(
        "--output", type=Path, default=Path("demo-output"), help="where the PNG plot goes"
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave everything running, print commands to try, stop on Ctrl-C",
    )


_GLOBAL_DEFAULTS = {"log_level": "info", "log_format": "text"}


def _global_flags() -> argparse.ArgumentParser:
    """Flags every command takes, before or after its name (`xdsproxy serve --log-format=json`,
    as a container's args list them). SUPPRESS keeps a subcommand's unset flag from hiding one
    given before the command."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=("debug", "info", "warning", "error")
    )
    flags.add_argument("--log-format", default=argparse.SUPPRESS, choices=("text", "json"))
    return flags


def main(argv: list[str] | None = None) -> int:
    if logs.format_in(sys.argv[1:] if argv is None else argv) == "json":
        # gRPC's C core writes its own plain-text lines to stderr; with JSON logs, only errors
        # would break a log pipeline's parsing, and those are reported by xdsproxy itself.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    common = _global_flags()
    parser = _Parser(prog="xdsproxy", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _serve_parser,
        _sim_parser,
        _demo_parser,
        _status_parser,
        _config_parser,
        _scope_parser,
    ):
        add(sub, common)
    args = parser.parse_args(argv)
    for name, default in _GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    logs.configure(args.log_level, args.log_format)
    if args.command == "serve":
        return _serve(args)
    if args.command == "sim":
        return _sim(args)
    if args.command in ("status", "config", "scope"):
        from xdsproxy.debug.status import StatusError

        try:
            print(_inspect(args), flush=True)
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except StatusError as exc:
            logs.say(str(exc))
            return 1
        return 0
    from xdsproxy.demo import run_demo

    return run_demo(args.services, args.calls, args.output, args.keep_running)


def _inspect(args: argparse.Namespace) -> str:
    """The commands that read (and, for scope add|forget, write) through the admin endpoints."""
    from xdsproxy.debug import scopecmd
    from xdsproxy.debug.proxyconfig import proxy_config
    from xdsproxy.debug.status import status

    urls = _admin_urls(args)
    if args.command == "status":
        return status(urls, args.name, args.json)
    if args.command == "config":
        return proxy_config(urls, args.kind, args.name, args.fqdn, args.diff)
    if args.verb == "why":
        return scopecmd.why(urls, args.name, args.host, args.json)
    if args.verb == "export":
        return scopecmd.export(urls, args.name)
    return scopecmd.change(urls, args.verb, args.name, args.host)


def _serve(args: argparse.Namespace) -> int:
    from xdsproxy.istio.names import vhost_service
    from xdsproxy.scope.egress import EgressSettings
    from xdsproxy.scope.rules import RulesError, load_rules
    from xdsproxy.server import preflight
    from xdsproxy.server.app import AddressInUse, ServeConfig, run
    from xdsproxy.store.base import StoreError

    def fail(message: str) -> int:
        logs.say(message)
        return 2

    egress = vhost_service(args.egress) if args.egress else None
    if args.mode == "lazy" and egress is None:
        return fail("--mode lazy needs --egress FQDN:PORT")
    als_host, _, als_port = args.als_advertise.rpartition(":")
    if not als_host or not als_port.isdigit():
        return fail("--als-advertise must be HOST:PORT")
    try:
        rules = load_rules(args.rules) if args.rules else None
    except RulesError as exc:
        return fail(str(exc))
    for warning in rules.warnings if rules else ():
        log.warning("rules: %s", warning)
    if bool(args.cert) != bool(args.key):
        return fail("--cert and --key go together")
    if args.listen_tls and not args.cert:
        return fail("--listen-tls needs --cert and --key")
    for path in (args.cert, args.key, args.upstream_ca):
        if path is not None and not path.is_file():
            return fail(f"{path}: no such file")
    try:
        addresses = {
            "--upstream": args.upstream,
            "--listen": args.listen,
            "--listen-tls": args.listen_tls,
            "--als-listen": args.als_listen,
            "--debug-listen": args.debug_listen,
            "--admin-listen": args.admin_listen,
        }
        for flag, value in addresses.items():
            if value:
                preflight.check_address(flag, value)
        if args.admin_writes:
            preflight.check_admin_writes(args.admin_listen)
        preflight.check_cidrs("--als-allow", tuple(args.als_allow))
        preflight.check_cidrs("--service-cidr", tuple(args.service_cidr))
        if args.upstream_ca:
            preflight.check_ca("--upstream-ca", args.upstream_ca)
        if args.cert:
            preflight.check_key_pair(args.cert, args.key)
        if args.mode == "lazy":
            preflight.check_store(args.store)
    except preflight.ConfigError as exc:
        return fail(str(exc))
    if args.mode == "passthrough":
        _warn_lazy_only(args)
    if args.check:
        logs.say("configuration ok", logging.INFO)
        return 0
    config = ServeConfig(
        upstream=args.upstream,
        listen=args.listen,
        listen_tls=args.listen_tls,
        upstream_ca=args.upstream_ca,
        upstream_sni=args.upstream_sni,
        upstream_connections=args.upstream_connections,
        cert=args.cert,
        key=args.key,
        max_message_bytes=args.max_message_bytes,
        max_pending_bytes=args.max_pending_bytes,
        mode=args.mode,
        egress=egress,
        egress_settings=EgressSettings(
            args.egress_port, args.egress_bind, als_host, int(als_port), not args.egress_plaintext
        ),
        als_listen=args.als_listen,
        als_allow=tuple(args.als_allow),
        rules=rules,
        rules_file=args.rules,
        lazy_tcp=args.lazy_tcp,
        lazy_sniffed=args.lazy_sniffed,
        service_cidrs=tuple(args.service_cidr),
        store=args.store,
        ttl_seconds=args.ttl,
        flush_seconds=args.flush_interval,
        usage_sample_percent=args.usage_sample,
        debug_listen=args.debug_listen,
        admin_listen=args.admin_listen,
        admin_writes=args.admin_writes,
        replica=os.environ.get("POD_NAME") or socket.gethostname(),
        fail_open=args.fail_open,
        fail_open_hold_down=args.fail_open_hold_down,
    )
    try:
        asyncio.run(run(config))
    except AddressInUse as exc:
        return fail(str(exc))
    except StoreError as exc:  # serving empty scopes would strip every reconnecting sidecar
        logs.say(
            f"cannot load the store {args.store}: {exc}; check that it is reachable "
            "and writable (see docs/state.md)"
        )
        return 1
    return 0


# Flags that only lazy mode reads, with their defaults: given in passthrough mode, they would
# be silently ignored.
_LAZY_ONLY = {
    "egress": "",
    "rules": None,
    "als_allow": [],
    "lazy_tcp": "auto",
    "lazy_sniffed": "placeholders",
    "service_cidr": [],
    "ttl": _duration("168h"),
    "flush_interval": _duration("10s"),
    "egress_plaintext": False,
    "fail_open": "never",
    "admin_writes": False,
}


def _warn_lazy_only(args: argparse.Namespace) -> None:
    for name, default in _LAZY_ONLY.items():
        if getattr(args, name) != default:
            flag = "--" + name.replace("_", "-")
            logs.say(f"{flag} is ignored in passthrough mode", logging.WARNING)


def _sim(args: argparse.Namespace) -> int:
    from xdsproxy.sim.mesh import generate
    from xdsproxy.sim.server import SimServer

    async def serve() -> None:
        mesh = generate(
            args.services, args.namespaces, registry_only=args.registry_only, profile=args.profile
        )
        server = SimServer(mesh, bind_address=args.bind_listeners)
        port = await server.start(args.listen)
        log.info("simulated istiod serving", extra={"port": port, "services": args.services})
        print(f"listening on port {port}", flush=True)
        # SIGHUP: push everything again, as Istiod does on a full push (for benchmarks).
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, server.push)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
