"""A bounded HTTP/1.1 client for exo's API: every wait has a total deadline.

`urllib`'s timeout applies to each socket operation, so a peer that sends one byte a second,
or exo's event stream with its keep-alive comments, keeps a request alive forever. Here each
request (connect, send, status line, headers, body) has ONE deadline: every `recv` waits at
most for what is left of it. Server-sent events (`text/event-stream`, exo's
`/instance/await`) are read the same way, under the caller's total deadline.

Every failure is a `PeerError` (a `UserError`): one line that names `--api URL`, the request,
and what happened: connection refused, host not found, no answer within N s, an answer not
complete after N s (bytes received), the connection closed in the middle of a body, not HTTP.
Only the standard library (name resolution runs in a thread, to bound it too).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlsplit

from profiler.errors import UserError

EXO_PORT = 52415
MAX_BODY = 64 * 1024 * 1024  # bytes; exo's /state of a large cluster is a few MB
MAX_LINE = 64 * 1024


class PeerError(UserError):
    """exo's API (or whatever answers at --api) misbehaved or could not be reached."""


class PeerTimeout(PeerError):
    """The request's deadline passed (nothing, or not all, came back)."""


class _Timeout(Exception):
    pass


class _Closed(Exception):
    pass


@dataclass(frozen=True)
class Endpoint:
    """A checked `--api` URL."""

    scheme: str
    host: str
    port: int
    prefix: str  # a path before exo's routes (a reverse proxy), no trailing slash

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"

    @property
    def label(self) -> str:
        return f"--api {self.url}"


def parse_api_url(text: str) -> Endpoint:
    """`http://HOST[:PORT][/prefix]` -> Endpoint; anything else is a UserError saying how to fix
    it. No port means exo's default, 52415."""
    hint = f"give exo's API as http://HOST:PORT (exo listens on port {EXO_PORT})"
    raw = (text or "").strip()
    if "://" not in raw:
        raise UserError(f"--api {text!r}: not a URL; {hint}")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as e:  # "Port out of range 0-65535", "Port could not be cast ..."
        raise UserError(f"--api {text!r}: bad port ({e}); {hint}") from None
    if parts.scheme not in ("http", "https"):
        raise UserError(f"--api {text!r}: scheme {parts.scheme!r} is not http or https; {hint}")
    if not parts.hostname:
        raise UserError(f"--api {text!r}: no host; {hint}")
    if port == 0:
        raise UserError(f"--api {text!r}: port 0 is not a port a server listens on; {hint}")
    if parts.query or parts.fragment:
        raise UserError(f"--api {text!r}: a query or fragment has no place in the API's "
                        f"address; {hint}")
    return Endpoint(parts.scheme, parts.hostname, port or EXO_PORT,
                    parts.path.rstrip("/"))


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


@dataclass
class _Conn:
    """One request's socket, read under a total deadline."""

    sock: socket.socket
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    received: int = 0

    def _fill(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Timeout
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            raise _Timeout from None
        if not data:
            raise _Closed
        self.buf += data
        self.received += len(data)

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > MAX_LINE:
                raise ValueError("a header line longer than 64 KiB")
            self._fill()

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_some(self) -> bytes:
        if not self.buf:
            self._fill()
        out = bytes(self.buf)
        self.buf.clear()
        return out


class Client:
    """Requests to exo's API; `timeout_s` bounds each whole request."""

    def __init__(self, endpoint: Endpoint, timeout_s: float = 10.0) -> None:
        if not timeout_s > 0:
            raise UserError(f"--timeout {timeout_s}: must be a positive number of seconds")
        self.endpoint = endpoint
        self.timeout_s = timeout_s

    # ------------------------------------------------------------ plain requests

    def request(self, method: str, path: str, body: Any = None,
                timeout_s: float | None = None) -> Response:
        t = timeout_s or self.timeout_s
        deadline = time.monotonic() + t
        what = f"{method} {path.split('?')[0]}"
        with self._connect(deadline, t) as sock:
            conn = _Conn(sock, deadline)
            try:
                self._send(sock, method, path, body)
                resp = self._head(conn, what)
                resp.body = b"".join(self._body(conn, resp, what))
                return resp
            except _Timeout:
                raise self._timeout_error(what, t, conn.received) from None

    def json(self, method: str, path: str, body: Any = None,
             timeout_s: float | None = None) -> tuple[int, Any]:
        """(status, parsed JSON body); a body that is not JSON is a PeerError unless the status
        says it is an error (then the text is returned as a string)."""
        resp = self.request(method, path, body, timeout_s)
        try:
            return resp.status, json.loads(resp.body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            if resp.status >= 400:
                return resp.status, resp.body.decode("utf-8", "replace").strip()
            raise PeerError(f"{self.endpoint.label}: {method} {path.split('?')[0]} answered "
                            f"HTTP {resp.status} with a body that is not JSON "
                            f"({_preview(resp.body)}); is --api pointing at exo's API?"
                            ) from None

    # ------------------------------------------------------------ server-sent events

    def events(self, path: str, deadline: float) -> Iterator[tuple[str, Any]]:
        """GET an event stream; yields ("data", text) per event and ("comment", text) per
        comment line (exo's keep-alives), until the stream ends. Raises _Timeout-free
        PeerErrors; the caller's `deadline` (time.monotonic()) bounds the whole stream and is
        reported as a `TimeoutError` with the bytes received."""
        what = f"GET {path.split('?')[0]}"
        t = max(0.0, deadline - time.monotonic())
        with self._connect(deadline, t) as sock:
            conn = _Conn(sock, deadline)
            try:
                self._send(sock, "GET", path, None, accept="text/event-stream")
                resp = self._head(conn, what)
                if resp.status >= 300 or resp.content_type != "text/event-stream":
                    resp.body = b"".join(self._body(conn, resp, what))
                    yield "response", resp
                    return
                pending, data = b"", []
                for piece in self._body(conn, resp, what):
                    pending += piece
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        line = raw.rstrip(b"\r").decode("utf-8", "replace")
                        if line == "":
                            if data:
                                yield "data", "\n".join(data)
                                data = []
                        elif line.startswith(":"):
                            yield "comment", line[1:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].lstrip(" "))
                if data:
                    yield "data", "\n".join(data)
            except _Timeout:
                raise TimeoutError(conn.received) from None

    # ------------------------------------------------------------ internals

    def _connect(self, deadline: float, t: float) -> socket.socket:
        ep = self.endpoint
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerError(f"{ep.label}: no time left to connect (the wait of {t:g} s is over)")
        sock = None
        for family, kind, proto, _, addr in self._resolve(deadline, t):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.connect(addr)
                break
            except ConnectionRefusedError:
                sock.close()
                raise PeerError(f"{ep.label}: connection refused (nothing listens on port "
                                f"{ep.port} of {ep.host}); is exo running there? exo's API "
                                f"listens on port {EXO_PORT}") from None
            except (socket.timeout, TimeoutError):
                sock.close()
                raise PeerError(f"{ep.label}: no connection within {t:g} s (host down, or a "
                                "firewall drops the connection)") from None
            except OSError as e:
                sock.close()
                raise PeerError(f"{ep.label}: cannot connect ({e.strerror or e})") from None
        if ep.scheme == "https":
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=ep.host)
            except (ssl.SSLError, OSError) as e:
                sock.close()
                raise PeerError(f"{ep.label}: TLS handshake failed ({e}); is it http?") \
                    from None
        return sock

    def _resolve(self, deadline: float, t: float) -> list:
        """getaddrinfo under the deadline (the system resolver has no timeout of its own, so it
        runs in a daemon thread that is abandoned if it overruns)."""
        ep, box = self.endpoint, {}

        def go() -> None:
            try:
                box["addrs"] = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
            except OSError as e:
                box["error"] = e

        worker = threading.Thread(target=go, daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            raise PeerError(f"{ep.label}: the host name {ep.host!r} did not resolve within "
                            f"{t:g} s; check the host name or DNS")
        if "error" in box or not box.get("addrs"):
            e = box.get("error")
            raise PeerError(f"{ep.label}: cannot resolve host {ep.host!r} "
                            f"({getattr(e, 'strerror', None) or e or 'no address'}); check the "
                            "host name")
        return box["addrs"]

    def _send(self, sock: socket.socket, method: str, path: str, body: Any,
              accept: str = "application/json") -> None:
        data = b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {self.endpoint.prefix}{path} HTTP/1.1",
                f"Host: {self.endpoint.host}:{self.endpoint.port}", f"Accept: {accept}",
                "Connection: close", "User-Agent: exo-bridge"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        except (socket.timeout, TimeoutError):
            raise _Timeout from None
        except OSError as e:
            raise PeerError(f"{self.endpoint.label}: {method} {path.split('?')[0]}: sending "
                            f"the request failed ({e.strerror or e})") from None

    def _head(self, conn: _Conn, what: str) -> Response:
        label = self.endpoint.label
        status_line = b""
        try:
            status_line = conn.readline()
            parts = status_line.decode("latin-1").strip().split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise ValueError
            headers: dict[str, str] = {}
            while True:
                line = conn.readline().decode("latin-1").strip()
                if not line:
                    break
                k, sep, v = line.partition(":")
                if not sep:
                    raise ValueError
                headers[k.strip().lower()] = v.strip()
        except ValueError:
            raise PeerError(f"{label}: {what}: the peer does not speak HTTP (it sent "
                            f"{_preview(bytes(conn.buf) or status_line)}); is --api pointing "
                            "at exo's API?") from None
        except _Closed:
            if conn.received:
                raise PeerError(f"{label}: {what}: the connection closed in the middle of the "
                                f"response headers ({conn.received} bytes received)") from None
            raise PeerError(f"{label}: {what}: the peer accepted the connection and closed it "
                            "without answering") from None
        except ConnectionResetError:
            raise PeerError(f"{label}: {what}: the peer reset the connection") from None
        except OSError as e:
            raise PeerError(f"{label}: {what}: reading the answer failed "
                            f"({e.strerror or e})") from None
        return Response(int(parts[1]), parts[2] if len(parts) > 2 else "", headers)

    def _body(self, conn: _Conn, resp: Response, what: str) -> Iterator[bytes]:
        """The body's bytes as they arrive: Content-Length, chunked, or up to the close."""
        label = self.endpoint.label
        te = resp.headers.get("transfer-encoding", "").lower()
        total = 0
        try:
            if "chunked" in te:
                while True:
                    size_line = conn.readline().split(b";")[0].strip()
                    try:
                        size = int(size_line, 16)
                    except ValueError:
                        raise PeerError(f"{label}: {what}: a malformed chunked body (chunk "
                                        f"size {_preview(size_line)})") from None
                    if size == 0:
                        return
                    total += size
                    self._check_size(total, what)
                    yield conn.read(size)
                    conn.read(2)
            elif "content-length" in resp.headers:
                try:
                    n = int(resp.headers["content-length"])
                except ValueError:
                    raise PeerError(f"{label}: {what}: Content-Length "
                                    f"{resp.headers['content-length']!r} is not a number") \
                        from None
                self._check_size(n, what)
                got = 0
                try:
                    while got < n:
                        piece = conn.read_some()[:n - got]
                        got += len(piece)
                        yield piece
                except _Closed:
                    raise PeerError(f"{label}: {what}: the connection closed in the middle of "
                                    f"the body ({got} of {n} bytes)") from None
            elif resp.status in (204, 304) or 100 <= resp.status < 200:
                return
            else:
                while True:
                    try:
                        piece = conn.read_some()
                    except _Closed:
                        return
                    total += len(piece)
                    self._check_size(total, what)
                    yield piece
        except _Closed:
            raise PeerError(f"{label}: {what}: the connection closed in the middle of the "
                            f"(chunked) body after {total} bytes") from None
        except ConnectionResetError:
            raise PeerError(f"{label}: {what}: the peer reset the connection in the middle of "
                            "the body") from None
        except ValueError as e:
            raise PeerError(f"{label}: {what}: a malformed body ({e})") from None
        except OSError as e:
            if isinstance(e, (socket.timeout, TimeoutError)):
                raise _Timeout from None
            raise PeerError(f"{label}: {what}: reading the body failed "
                            f"({e.strerror or e})") from None

    def _check_size(self, n: int, what: str) -> None:
        if n > MAX_BODY:
            raise PeerError(f"{self.endpoint.label}: {what}: the answer is larger than "
                            f"{MAX_BODY // 2 ** 20} MiB; is --api pointing at exo's API?")

    def _timeout_error(self, what: str, t: float, received: int) -> PeerTimeout:
        label = self.endpoint.label
        if received == 0:
            return PeerTimeout(f"{label}: {what}: no answer within {t:g} s (the connection was "
                             "accepted; --timeout sets this bound)")
        return PeerTimeout(f"{label}: {what}: the answer was not complete after {t:g} s "
                         f"({received} bytes received; --timeout sets this bound)")


def _preview(raw: bytes, n: int = 40) -> str:
    text = raw[:n].decode("utf-8", "replace")
    return repr(text + ("..." if len(raw) > n else "")) if raw else "nothing"
