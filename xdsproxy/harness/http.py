"""HTTP backends and a client that reaches a sidecar the way iptables would deliver traffic.

Without iptables on loopback, the client states the original destination in a PROXY protocol
header, and the simulator's `virtualOutbound` (with `proxy_protocol=True`) hands the connection
to the listener for that destination, as Istio's redirect would.
"""

import contextlib
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:
        body = json.dumps({"backend": self.server.name, "headers": dict(self.headers)}).encode()
        self.server.requests.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], name: str) -> None:
        super().__init__(address, _Handler)
        self.name = name
        self.requests: list[dict[str, str]] = []


class Backend:
    """A named HTTP server on loopback that answers with its name and the headers it got."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = _Server((host, port), name)
        self.host, self.port = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def requests(self) -> list[dict[str, str]]:
        return self.server.requests

    def __enter__(self) -> "Backend":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def request_via_sidecar(
    sidecar_port: int,
    original_dst: tuple[str, int],
    host: str,
    source: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """GET / through a sidecar's virtualOutbound, as if the app had dialled `original_dst`."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    proxy_line = f"PROXY TCP4 {source} {original_dst[0]} 40000 {original_dst[1]}\r\n"
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", sidecar_port), timeout=timeout) as conn:
        conn.sendall(proxy_line.encode() + request.encode())
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return Reply(status, body)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EchoServer:
    """A TCP server on loopback that echoes what it reads: a stand-in for a TCP service
    (database, cache) behind a tcp_proxy listener.

    With a `greeting` it speaks first, as MySQL, SMTP or Redis-compatible servers do; with a
    `name` it also answers an HTTP request (one per connection) with that name, as a service
    on a protocol-sniffed port may be called either way."""

    def __init__(self, host: str = "127.0.0.1", greeting: bytes = b"", name: str = "") -> None:
        self.greeting = greeting
        self.name = name
        self.sock = socket.create_server((host, 0))
        self.host, self.port = self.sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.greeting:
                    conn.sendall(self.greeting)
                data = conn.recv(65536)
                if self.name and data.startswith((b"GET ", b"POST ", b"HEAD ")):
                    body = json.dumps({"backend": self.name}).encode()
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    return
                while data:
                    conn.sendall(data)
                    data = conn.recv(65536)
            except OSError:
                return

    def __enter__(self) -> "EchoServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # close() alone leaves a thread blocked in accept() holding the listening socket open
        # in the kernel: it would go on accepting on its port after the test. shutdown()
        # wakes the thread (accept fails) and stops the listening at once.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


def connect_via_sidecar(
    sidecar_port: int, original_dst: tuple[str, int], source: str = "127.0.0.1"
) -> socket.socket:
    """A TCP connection through a sidecar's virtualOutbound, as if the app dialled
    `original_dst` (see the module doc)."""
    conn = socket.create_connection(("127.0.0.1", sidecar_port), timeout=10)
    proxy_line = f"PROXY TCP4 {source} {original_dst[0]} 40000 {original_dst[1]}\r\n"
    conn.sendall(proxy_line.encode())
    return conn


def echoes(conn: socket.socket, payload: bytes = b"ping\n") -> bool:
    """The connection is open end to end: what is sent comes back."""
    try:
        conn.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = conn.recv(65536)
            if not chunk:
                return False
            received += chunk
        return received == payload
    except OSError:
        return False


def answers(conn: socket.socket) -> bool:
    """The service at the other end says something: its greeting, or the echo of a ping."""
    try:
        conn.sendall(b"ping\n")
        return bool(conn.recv(65536))
    except OSError:
        return False
