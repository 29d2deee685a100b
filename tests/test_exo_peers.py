"""`exo-bridge place` against misbehaving peers at --api: real sockets on loopback, one small
server per misbehaviour. Each answer: exit code 2, one line naming --api and what happened,
no traceback, and a bound on every wait (--timeout for a request, --wait for the instance)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from exo_server import GIB, ExoServer, FakeNode
from graphsplit.plan import Plan, Stage, write_plan
from test_bridge_place import one_error_line, place

MODEL = "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"


class Peer:
    """A TCP server on 127.0.0.1 that runs `behave(conn)` for every connection."""

    def __init__(self, behave) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.behave = behave
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            self.behave(conn, self.stop)
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self) -> "Peer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.sock.close()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    conn.settimeout(10)
    while b"\r\n\r\n" not in data:
        piece = conn.recv(4096)
        if not piece:
            break
        data += piece
    return data


@pytest.fixture
def plan(tmp_path):
    p = Plan(model={"name": "llama", "n_layers": 32, "config_hash": "sha256:x",
                    "repo_id": MODEL},
             stages=[Stage("studio", 0, 32)], runtime="exo-current",
             predicted={"stage_memory_bytes": {"studio": GIB}},
             nodes={"studio": {"memory_bytes": 12 * GIB}})
    return str(write_plan(p, tmp_path / "plan.json"))


def fails_naming_api(plan: str, api: str, *needles: str, extra=()) -> str:
    rc, _, err = place("--plan", plan, "--api", api, "--timeout", "1", *extra)
    assert rc == 2, err
    line = one_error_line(err)
    assert "--api" in line, line
    for n in needles:
        assert n in line, line
    return line


def test_another_protocol(plan):
    def ssh(conn, stop):
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        read_request(conn)

    with Peer(ssh) as peer:
        fails_naming_api(plan, peer.url, "does not speak HTTP", "SSH-2.0")


def test_closes_in_the_middle_of_a_body(plan):
    def half(conn, stop):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"nodeMemory\": {")

    with Peer(half) as peer:
        fails_naming_api(plan, peer.url, "connection closed in the middle of the body",
                         "16 of 1000 bytes")


def test_accepts_and_never_answers(plan):
    def silent(conn, stop):
        read_request(conn)
        stop.wait(30)

    with Peer(silent) as peer:
        fails_naming_api(plan, peer.url, "no answer within 1 s")


def test_answers_slowly_forever(plan):
    """One byte every 0.2 s of a plausible answer: each read succeeds, so only a total
    deadline ends it."""
    def drip(conn, stop):
        read_request(conn)
        for b in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" * 100:
            if stop.wait(0.2):
                return
            conn.sendall(bytes([b]))

    with Peer(drip) as peer:
        fails_naming_api(plan, peer.url, "not complete after 1 s", "bytes received")


@pytest.mark.parametrize("state, needle", [
    ({"nodeMemory": [1, 2]}, "state.nodeMemory"),
    ({"nodeMemory": {"n": {"ramAvailable": {"inBytes": "lots"}}}}, "ramAvailable"),
    ({"nodeIdentities": {"n": {"friendlyName": "studio"}}, "topology": {"connections": [3]}},
     "GET /state"),
    ([1, 2, 3], "GET /state"),
])
def test_body_with_wrong_types(plan, state, needle):
    body = json.dumps(state).encode()

    def wrong(conn, stop):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)

    with Peer(wrong) as peer:
        fails_naming_api(plan, peer.url, needle)


def test_not_json(plan):
    def html(conn, stop):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 15\r\n\r\n"
                     b"<html>hi</html>")

    with Peer(html) as peer:
        fails_naming_api(plan, peer.url, "not JSON")


def test_closed_port_is_connection_refused(plan):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    fails_naming_api(plan, f"http://127.0.0.1:{port}", "connection refused")


@pytest.mark.parametrize("api, needle", [
    ("http://h:99999", "bad port"),
    ("http://h:port", "bad port"),
    ("foo", "not a URL"),
    ("http://127.0.0.1:0", "port 0"),
    ("ftp://127.0.0.1:52415", "not http"),
    ("http://:52415", "no host"),
    ("http://no-such-host.invalid:52415", "resolve"),  # RFC 2606: never resolves
])
def test_malformed_api(plan, api, needle):
    fails_naming_api(plan, api, needle)


def test_event_stream_of_keepalives_is_bounded_by_wait(plan):
    """exo's API up, the instance accepted, then an await stream that only ever sends
    keep-alives (exo's own timeout never comes): the bridge's --wait ends it."""
    with ExoServer([FakeNode("id-studio", "studio", 64 * GIB, 48 * GIB)], keepalive_s=0.05,
                   apply_delay_s=3600, honour_timeout=False) as srv:
        rc, _, err = place("--plan", plan, "--api", srv.url, "--wait", "1")
        assert rc == 2
        assert "not report it ready within 1 s (--wait)" in one_error_line(err)
