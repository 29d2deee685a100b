"""`profile-link`: measure a link's latency and bandwidth at the sizes a pipeline really sends.

Two hosts, plain TCP (the transport of MLX's ring backend):

    host B$ profile-link serve --port 52900
    host A$ profile-link measure B:52900 --hidden 4096 --dtype-bytes 2 --prompt-tokens 512 \\
                --cluster cluster.json --from A --to B

The client sends a message of S bytes and waits for a 1-byte reply (a ping-pong over one kept
connection, TCP_NODELAY), for S = 1 byte, one token's activation (hidden x dtype bytes) and one
prompt's activation (prompt_tokens x hidden x dtype bytes), each repeated and the median kept:

    rtt(S) = 2 * alpha + S / beta      =>   alpha = rtt(1) / 2,
                                            beta  = (S_big - 1) / (rtt(S_big) - rtt(1))

which is the cost model's one-way time alpha + bytes / beta. The per-size one-way times are kept
too (`sizes`), so a link whose cost is not affine in the size (TCP slow start on big prompts)
shows up. `--cluster FILE --from A --to B` writes {latency_ms, bandwidth_gbps, measured} into the
cluster file's `links` (replacing the entry for that pair; `--both-ways` marks it symmetric),
atomically. `profile-link self-test` runs a server and a client on loopback.
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import statistics
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from profiler import options as o
from profiler.errors import UserError, guard
from profiler.files import atomic_write_json, locked, read_json

DEFAULT_PORT = 52900
_HDR = struct.Struct("!QI")  # payload bytes, reply bytes
HELLO = b"profile-link/1 hello\n"  # the client's first message (its payload)
ACK = b"profile-link/1 ok\n"  # the server's answer to it; any other message is answered zeros
MAX_MESSAGE = 1 << 30  # bytes of one ping-pong message, both sides
SERVER_IDLE_S = 600  # a client silent this long is dropped


@dataclass
class LinkMeasurement:
    """One direction's measurement: alpha (one-way latency) and beta (bandwidth)."""

    host: str
    latency_ms: float
    bandwidth_gbps: float  # gigaBITS per second, the cluster file's unit
    sizes: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> {bytes, rtt_ms...}
    repeats: int = 0
    method: str = "tcp ping-pong, median; alpha = rtt(1B)/2, beta from rtt(big) - rtt(1B)"

    def one_way_s(self, nbytes: float) -> float:
        return self.latency_ms / 1e3 + nbytes * 8 / (self.bandwidth_gbps * 1e9)


# --------------------------------------------------------------------------------- server


def _drain(conn: socket.socket, n: int, buf: bytearray) -> bool:
    """Read and discard exactly n bytes."""
    left = n
    view = memoryview(buf)
    while left:
        k = conn.recv_into(view[: min(left, len(buf))])
        if k == 0:
            return False
        left -= k
    return True


def _handle(conn: socket.socket, peer: str = "?") -> None:
    """Answer one client's ping-pongs; a client that does not speak the protocol (a header
    asking for more than MAX_MESSAGE bytes or a reply longer than the hello's), goes quiet for
    SERVER_IDLE_S or drops the connection is closed with one line on stderr; the server goes on."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(SERVER_IDLE_S)
    buf = bytearray(1 << 20)
    hdr = bytearray(_HDR.size)
    with conn:
        try:
            while True:
                if not _drain_into(conn, hdr):
                    return
                n, reply = _HDR.unpack(bytes(hdr))
                if n > MAX_MESSAGE or reply > len(ACK):
                    print(f"profile-link: closed the connection from {peer}: not a profile-link "
                          f"client (asked for {n} bytes, reply {reply})", file=sys.stderr)
                    return
                if n == len(HELLO):
                    msg = bytearray(n)
                    if not _drain_into(conn, msg):
                        return
                    conn.sendall(ACK[:reply] if bytes(msg) == HELLO else b"\0" * reply)
                    continue
                if not _drain(conn, n, buf):
                    return
                conn.sendall(b"\0" * reply)
        except (socket.timeout, OSError) as e:
            print(f"profile-link: closed the connection from {peer}: "
                  f"{'idle for ' + str(SERVER_IDLE_S) + ' s' if isinstance(e, socket.timeout) else e}",
                  file=sys.stderr)


def _drain_into(conn: socket.socket, out: bytearray) -> bool:
    view = memoryview(out)
    got = 0
    while got < len(out):
        k = conn.recv_into(view[got:])
        if k == 0:
            return False
        got += k
    return True


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (address in use, not this machine's,
    no permission, unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror}); give an address of "
                        "this machine, e.g. 0.0.0.0") from None
    fam, _, _, _, addr = infos[0]
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind(addr)
        srv.listen(4)
    except OSError as e:
        srv.close()
        hint = {errno.EADDRINUSE: f"port {port} is already in use; pick another --port or stop "
                                  "the program using it",
                errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; use one of its "
                                     "addresses or 0.0.0.0",
                errno.EACCES: f"no permission to listen on port {port} (ports below 1024 need "
                              "root); use a port from 1024 to 65535"}.get(e.errno)
        raise UserError(f"profile-link serve on {host}:{port}: "
                        f"{hint or e.strerror or e}") from None
    return srv


def serve(host: str = "0.0.0.0", port: int = DEFAULT_PORT, stop: threading.Event | None = None,
          ready: threading.Event | None = None, once: bool = False) -> int:
    """Answer ping-pongs until `stop` is set (or after one client with `once`). Returns the port."""
    srv = _listen(host, port)
    srv.settimeout(0.2)
    if ready is not None:
        ready.port = srv.getsockname()[1]  # type: ignore[attr-defined]
        ready.set()
    try:
        while stop is None or not stop.is_set():
            try:
                conn, addr = srv.accept()
            except socket.timeout:
                continue
            peer = f"{addr[0]}:{addr[1]}"
            if once:
                _handle(conn, peer)
                break
            threading.Thread(target=_handle, args=(conn, peer), daemon=True).start()
    finally:
        srv.close()
    return port


def serve_in_thread(host: str = "127.0.0.1", port: int = 0) -> tuple[int, threading.Event]:
    """Start a server thread; returns (port, stop event)."""
    stop, ready = threading.Event(), threading.Event()
    threading.Thread(target=serve, args=(host, port, stop, ready), daemon=True).start()
    if not ready.wait(5):
        raise UserError(f"could not start a profile-link server on {host}:{port}")
    return ready.port, stop  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------- client


class _Late(UserError):
    """The measurement's deadline passed."""


class _Peer:
    """One connection to a `profile-link serve`, every wait bounded by one total deadline."""

    def __init__(self, sock: socket.socket, where: str, deadline: float, timeout_s: float):
        self.sock, self.where, self.deadline, self.timeout_s = sock, where, deadline, timeout_s

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._late()
        return left

    def _late(self) -> UserError:
        return _Late(f"the profile-link server at {self.where} did not finish the "
                         f"measurement within --timeout {self.timeout_s:g} s (it answers too "
                         "slowly or not at all); check the server, or raise --timeout")

    def send(self, data: bytes) -> None:
        try:
            self.sock.settimeout(self._left())
            self.sock.sendall(data)
        except socket.timeout:
            raise self._late() from None
        except OSError as e:
            raise UserError(f"the profile-link server at {self.where} closed the connection "
                            f"while a message was being sent ({e.strerror or e}); is it a "
                            "`profile-link serve`, and still running?") from None

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                self.sock.settimeout(self._left())
                chunk = self.sock.recv(n - len(out))
            except socket.timeout:
                raise self._late() from None
            except OSError as e:
                chunk, err = b"", e
            else:
                err = None
            if not chunk:
                raise UserError(f"the profile-link server at {self.where} closed the connection "
                                f"in the middle of a reply ({len(out)} of {n} bytes"
                                f"{', ' + (err.strerror or str(err)) if err else ''}); is it a "
                                "`profile-link serve`, and still running?")
            out += chunk
        return bytes(out)

    def hello(self) -> None:
        """The first exchange: a server of another protocol is named here, not mid-measure."""
        self.send(_HDR.pack(len(HELLO), len(ACK)) + HELLO)
        try:
            got = self.recv(len(ACK))
        except _Late:
            raise UserError(f"{self.where} accepted the connection but did not answer the "
                            f"greeting within --timeout {self.timeout_s:g} s; is a `profile-link "
                            "serve` listening there?") from None
        except UserError:
            raise UserError(f"{self.where} does not answer as a profile-link server (it closed "
                            "the connection during the greeting); start `profile-link serve` "
                            "there, or check the port") from None
        if got != ACK:
            raise UserError(f"{self.where} speaks another protocol, not profile-link (it "
                            f"answered {got[:12]!r}); point measure at a `profile-link serve` "
                            "port")

    def pingpong(self, payload: bytes, reply: int = 1) -> float:
        t0 = time.perf_counter()
        self.send(_HDR.pack(len(payload), reply) + payload)
        got = self.recv(reply)
        dt = time.perf_counter() - t0
        if got != b"\0" * reply:
            raise UserError(f"the profile-link server at {self.where} answered {got[:12]!r} "
                            "where a zero byte belongs: it does not speak this version of "
                            "profile-link")
        return dt


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP connection, or one line that says what really happened: nothing listening
    (refused), an unknown host, no answer (filtered / down), an unreachable network."""
    where = f"{host}:{port}"
    try:
        return socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        raise UserError(f"nothing listens at {where} (connection refused); start `profile-link "
                        f"serve --port {port}` there, or check the port") from None
    except socket.gaierror as e:
        raise UserError(f"cannot resolve host {host!r} ({e.strerror}); check the name or give "
                        "an IP address") from None
    except socket.timeout:
        raise UserError(f"cannot reach {where}: no answer within --timeout {timeout_s:g} s (the "
                        "host is down or a firewall drops the connection)") from None
    except OSError as e:
        raise UserError(f"cannot reach a profile-link server at {where} ({e.strerror or e}); "
                        f"start one there with `profile-link serve --port {port}`") from None


def measure(host: str, port: int = DEFAULT_PORT, sizes: dict[str, int] | None = None,
            repeats: int = 15, warmup: int = 3, timeout_s: float = 60.0,
            gap_s: float = 0.0) -> LinkMeasurement:
    """Ping-pong each size `repeats` times over one connection; median RTT per size.

    gap_s: idle time before each ping-pong (the pipeline's pattern: a message per token after
    compute; with TCP slow-start-after-idle a gap makes big messages slower). timeout_s bounds
    the whole measurement (connect, greeting and every ping-pong): a server that never answers,
    answers slowly forever, closes mid-reply or speaks another protocol is one UserError.
    """
    sizes = dict(sizes or {"token": 8192, "prompt": 8192 * 128})
    sizes = {"ping": 1, **sizes}
    deadline = time.monotonic() + timeout_s
    sock = connect(host, port, timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer = _Peer(sock, f"{host}:{port}", deadline, timeout_s)
    table: dict[str, dict[str, float]] = {}
    with sock:
        peer.hello()
        for label, n in sizes.items():
            payload = b"\x01" * int(n)
            for _ in range(warmup):
                peer.pingpong(payload)
            rtts = []
            for _ in range(repeats):
                if gap_s:
                    time.sleep(gap_s)
                rtts.append(peer.pingpong(payload))
            med = statistics.median(rtts)
            table[label] = {"bytes": int(n), "rtt_ms": 1e3 * med,
                            "rtt_min_ms": 1e3 * min(rtts), "rtt_max_ms": 1e3 * max(rtts)}
    alpha = table["ping"]["rtt_ms"] / 2e3
    big = max(table.values(), key=lambda d: d["bytes"])
    extra = big["rtt_ms"] / 1e3 - 2 * alpha
    if big["bytes"] <= 1 or extra <= 0:
        beta_Bps = float("inf")
    else:
        beta_Bps = (big["bytes"] - 1) / extra
    for d in table.values():  # one-way time the cost model would use for this size
        d["one_way_ms"] = d["rtt_ms"] - 1e3 * alpha
    gbps = beta_Bps * 8 / 1e9 if beta_Bps != float("inf") else 1e4
    return LinkMeasurement(host=f"{host}:{port}", latency_ms=1e3 * alpha,
                           bandwidth_gbps=gbps, sizes=table, repeats=repeats)


# ------------------------------------------------------------- the runtime's own path (MLX)

MLX_TAG = "PROFILE_LINK_MLX "


def _summarise(table: dict[str, dict[str, float]], host: str, repeats: int,
               method: str) -> LinkMeasurement:
    alpha = table["ping"]["rtt_ms"] / 2e3
    big = max(table.values(), key=lambda d: d["bytes"])
    extra = big["rtt_ms"] / 1e3 - 2 * alpha
    beta = (big["bytes"] - table["ping"]["bytes"]) / extra if extra > 0 else float("inf")
    for d in table.values():
        d["one_way_ms"] = d["rtt_ms"] - 1e3 * alpha
    gbps = beta * 8 / 1e9 if beta != float("inf") else 1e4
    return LinkMeasurement(host=host, latency_ms=1e3 * alpha, bandwidth_gbps=gbps, sizes=table,
                           repeats=repeats, method=method)


def mlx_pingpong(sizes: dict[str, int], repeats: int = 10, warmup: int = 2,
                 gap_s: float = 0.02) -> dict[str, dict[str, float]] | None:
    """Run in each of two processes of an MLX ring (MLX_HOSTFILE / MLX_RANK set): rank 0 sends
    an activation-sized float32 array, rank 1 answers with one int32, exactly as the runner's
    stages and its ring closure do (same `select()` wait before each recv). Rank 0 idles
    `gap_s` before each send, as a pipeline rank idles while the others compute. Returns the
    table on rank 0, None on rank 1."""
    import mlx.core as mx

    from exo_bridge.runner.stage_worker import ring_socket_fds, wait_readable

    g = mx.distributed.init(backend="ring", strict=True)
    if g.size() != 2:
        raise UserError(f"profile-link mlx needs a ring of 2 ranks, got {g.size()}")
    r = g.rank()
    fds = ring_socket_fds()
    sizes = {"ping": 4, **sizes}
    table: dict[str, dict[str, float]] = {}
    tok = mx.array([1], dtype=mx.int32)
    for label, n in sizes.items():
        x = mx.zeros((max(1, int(n) // 4),), dtype=mx.float32)
        mx.eval(x, tok)
        rtts = []
        for i in range(warmup + repeats):
            if r == 0:
                time.sleep(gap_s)
                t0 = time.perf_counter()
                mx.eval(mx.distributed.send(x, 1, group=g))
                wait_readable(fds)
                y = mx.distributed.recv((1,), mx.int32, 1, group=g)
                mx.eval(y)
                if i >= warmup:
                    rtts.append(time.perf_counter() - t0)
            else:
                wait_readable(fds)
                y = mx.distributed.recv_like(x, 0, group=g)
                mx.eval(y)
                mx.eval(mx.distributed.send(tok, 0, group=g))
        if r == 0:
            med = statistics.median(rtts)
            table[label] = {"bytes": int(x.nbytes), "rtt_ms": 1e3 * med,
                            "rtt_min_ms": 1e3 * min(rtts), "rtt_max_ms": 1e3 * max(rtts)}
    return table if r == 0 else None


def measure_mlx_local(sizes: dict[str, int], hostfiles: list[str] | None = None,
                      wrappers: list[list[str]] | None = None, repeats: int = 10,
                      gap_ms: float = 20.0, timeout_s: float = 120.0) -> LinkMeasurement:
    """Start the two ranks of `profile-link mlx` on this machine (loopback by default; the
    testbed passes per-rank hostfiles and namespace wrappers) and return rank 0's result."""
    outs = run_ranks_here("mlx", _mlx_rank_args(sizes, repeats, gap_ms), 2, hostfiles, wrappers,
                          timeout_s)
    d = rank0_result(outs[0], MLX_TAG, "mlx")
    return _summarise(d, "mx.distributed ring", repeats,
                      f"mx.distributed send/recv ping-pong (the runner's path), "
                      f"{gap_ms:g} ms idle before each, median")


def _mlx_rank_args(sizes: dict[str, int], repeats: int, gap_ms: float) -> list[str]:
    return ["--sizes", json.dumps(sizes), "--repeats", str(repeats), "--gap-ms", str(gap_ms)]


def start_rank(sub: str, rank: int, hostfile: str, args: list[str],
               wrapper: list[str] | None = None):
    """One `profile-link SUB --rank-from-env ARGS` rank as a child process (MLX_HOSTFILE /
    MLX_RANK in its env; `wrapper`: the testbed's namespace / cgroup prefix)."""
    import os
    import subprocess

    env = dict(os.environ, MLX_HOSTFILE=hostfile, MLX_RANK=str(rank))
    cmd = (wrapper or []) + [sys.executable, "-m", "exo_bridge.profile_link", sub,
                             "--rank-from-env", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def run_ranks_here(sub: str, args: list[str], k: int, hostfiles: list[str] | None = None,
                   wrappers: list[list[str]] | None = None,
                   timeout_s: float = 120.0) -> list[tuple[str, str]]:
    """Start the k ranks of `profile-link SUB` on this machine (a loopback ring hostfile by
    default) under one deadline and return each rank's (stdout, stderr); a rank that fails, or
    the deadline, is one UserError line naming the rank and its log (`_wait_ranks`)."""
    import os
    import tempfile

    tmp = None
    if hostfiles is None:
        from exo_bridge.runner.run import free_ports

        fd, tmp = tempfile.mkstemp(prefix=f"profile-link-{sub}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump([[f"127.0.0.1:{p}"] for p in free_ports(k)], f)
        hostfiles = [tmp] * k
    procs = []
    try:
        for r in range(k):
            procs.append(start_rank(sub, r, hostfiles[r], args,
                                    wrappers[r] if wrappers else None))
        return _wait_ranks(procs, timeout_s, sub=sub)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if tmp:
            os.unlink(tmp)


def run_rank(sub: str, rank: int, hostfile: str, args: list[str], timeout_s: float,
             hint: str) -> tuple[str, str]:
    """This host's rank of a multi-host `profile-link SUB`, in a child: MLX waits for its
    peers (ring connect, recv) inside C++ where no Python timer reaches; this process bounds
    it with `timeout_s`. Returns its (stdout, stderr)."""
    proc = start_rank(sub, rank, hostfile, args)
    try:
        return _wait_ranks([proc], timeout_s, ranks=[rank], hint=hint, sub=sub)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


def tagged(stdout: str, tag: str) -> dict[str, Any] | None:
    """The JSON a rank printed after `tag`, or None (only rank 0 reports)."""
    line = [ln for ln in stdout.splitlines() if ln.startswith(tag)]
    return json.loads(line[0][len(tag):]) if line else None


def rank0_result(out: tuple[str, str], tag: str, sub: str) -> dict[str, Any]:
    """Rank 0's result from its (stdout, stderr), or one line naming its kept log."""
    d = tagged(out[0], tag)
    if d is None:
        raise UserError(f"profile-link {sub} rank 0 printed no result; full log: "
                        f"{_keep_log(out[1], 0)}")
    return d


def _keep_log(stderr: str, rank: int) -> str:
    """Write a rank's whole stderr to a log file; return its path (named in the message)."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"profile-link-mlx-rank{rank}-", suffix=".log")
    with open(fd, "w") as f:
        f.write(stderr)
    return path


def _wait_ranks(procs, timeout_s: float, ranks: list[int] | None = None,
                hint: str = "", sub: str = "mlx") -> list[tuple[str, str]]:
    """Wait for the ranks of `profile-link SUB` under one deadline; the first that fails (or
    the deadline) stops all and is one line: "profile-link SUB rank N failed: <last error
    line>; full log: PATH"."""
    ranks = ranks or list(range(len(procs)))

    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs):
        dead = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outs = [p.communicate() for p in procs]
    bad = [r for r, p in enumerate(procs) if p.returncode != 0]
    if not bad:
        return outs
    r = next((r for r in bad if procs[r].returncode != -9), bad[0])
    err = outs[r][1]
    last = ([ln.strip() for ln in err.splitlines() if ln.strip()] or [""])[-1][:300]
    why = (f"did not finish within --timeout {timeout_s:g} s" + (f" ({hint})" if hint else "")
           if procs[r].returncode == -9 and time.monotonic() > deadline else
           (last or f"exited with code {procs[r].returncode}"))
    raise UserError(f"profile-link {sub} rank {ranks[r]} failed: {why}; full log: "
                    f"{_keep_log(err, ranks[r])}")


def activation_sizes(hidden: int, dtype_bytes: int, prompt_tokens: int) -> dict[str, int]:
    return {"token": hidden * dtype_bytes, "prompt": prompt_tokens * hidden * dtype_bytes}


# ---------------------------------------------------------------------------- cluster file


def write_link(cluster_path: str | Path, src: str, dst: str, m: LinkMeasurement,
               both_ways: bool = False, wait_s: float = 60.0) -> dict[str, Any]:
    """Put the measurement into the cluster file's `links` (replacing src->dst).

    Read-modify-write under the cluster file's lock (profiler.files.locked: a second
    `profile-link` writing the same file waits up to `wait_s`, then refuses in one line), so two
    measurements written at once both end up in the file; the write itself is atomic. The file
    is checked field by field first (graphsplit.cluster.check_fields): a bad one is refused,
    not rewritten."""
    path = Path(cluster_path)
    what = f"cluster file {path}"
    entry = {"from": src, "to": dst, "latency_ms": round(m.latency_ms, 4),
             "bandwidth_gbps": round(m.bandwidth_gbps, 6),
             "measured": {"by": "profile-link", "sizes": m.sizes, "repeats": m.repeats,
                          "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    if both_ways:
        entry["both_ways"] = True
    with locked(path, what, wait_s=wait_s):
        data = read_cluster_for_link(path, src, dst)
        links = [lk for lk in data.get("links", []) if not (
            (lk["from"], lk["to"]) == (src, dst)
            or (both_ways and (lk["from"], lk["to"]) == (dst, src)))]
        links.append(entry)
        data["links"] = links
        atomic_write_json(path, data, what=what)
    return entry


def read_cluster_for_link(cluster_path: str | Path, src: str, dst: str) -> dict[str, Any]:
    """The parsed cluster file, checked field by field, with nodes `src` and `dst`; called
    before measuring (a bad file is refused at once, not after the measurement) and again under
    the lock to write."""
    return read_cluster_with(cluster_path, [("--from", src), ("--to", dst)])


def read_cluster_with(cluster_path: str | Path, named: list[tuple[str, str]]) -> dict[str, Any]:
    """The parsed, field-checked cluster file; every (option, node id) of `named` must be one
    of its nodes (one line naming the option otherwise)."""
    from graphsplit.cluster import ClusterError, check_fields

    path = Path(cluster_path)
    what = f"cluster file {path}"
    data = read_json(path, what, error=ClusterError,
                     missing="write one first (README.md, 'A cluster file')")
    if not isinstance(data, dict):
        raise ClusterError(f"{what}: the top level must be a JSON object with 'nodes'")
    check_fields(data, what)
    ids = {n["id"] for n in data["nodes"]}
    for opt, x in named:
        if x not in ids:
            raise UserError(f"{what}: no node {x!r} (given by {opt}); nodes: "
                            f"{', '.join(sorted(ids))}")
    return data


# -------------------------------------------------------------------------------------- CLI


MAX_HIDDEN = 1 << 20
MAX_TOKENS = 1 << 20
MAX_TIMEOUT_S = 86400.0


def _message_args(p: argparse.ArgumentParser, prompt_help: str) -> None:
    """The model shape the message sizes come from: hidden size, activation bytes, prompt."""
    p.add_argument("--hidden", type=o.positive_int(MAX_HIDDEN), default=4096,
                   help="model hidden size (default 4096)")
    p.add_argument("--dtype-bytes", type=o.int_choice((1, 2, 4)), default=2,
                   help="activation bytes (default 2)")
    p.add_argument("--prompt-tokens", type=o.positive_int(MAX_TOKENS), default=128,
                   help=prompt_help)


def _measure_args(m: argparse.ArgumentParser, repeats: int, gap_ms: float) -> None:
    """The options `measure`, `self-test` and `mlx` share: message sizes, repeats, cluster."""
    _message_args(m, "prompt length (default 128)")
    m.add_argument("--repeats", type=o.positive_int(10000), default=repeats)
    m.add_argument("--gap-ms", type=o.float_in(0, 60000), default=gap_ms,
                   help="idle time before each ping-pong (the pipeline's pattern)")
    m.add_argument("--cluster", type=o.path("cluster file"), default=None,
                   help="cluster JSON to write the link into")
    m.add_argument("--from", dest="src", type=o.text("node id"), default=None,
                   help="link source node id")
    m.add_argument("--to", dest="dst", type=o.text("node id"), default=None,
                   help="link destination node id")
    m.add_argument("--both-ways", action="store_true", help="the link is symmetric")
    m.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = o.OneLineParser(prog="profile-link", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer ping-pongs (run on the receiving host)")
    s.add_argument("--host", type=o.host(), default="0.0.0.0")
    s.add_argument("--port", type=o.port(), default=DEFAULT_PORT)
    s.add_argument("--once", action="store_true", help="exit after one client")
    x = sub.add_parser("mlx", help="mx.distributed ping-pong, one of the two ranks (run one on "
                       "each host with the same ring hostfile, rank 0 reports)")
    x.add_argument("--hostfile", type=o.path("hostfile"),
                   help="ring hostfile [[\"ip:port\"], [\"ip:port\"]]")
    x.add_argument("--rank", type=o.int_in(0, 1), help="this host's rank (0 reports)")
    x.add_argument("--rank-from-env", action="store_true", help=argparse.SUPPRESS)
    x.add_argument("--sizes", type=o.json_sizes(MAX_MESSAGE), default=None, help=argparse.SUPPRESS)
    x.add_argument("--timeout", type=o.seconds(MAX_TIMEOUT_S), default=120.0,
                   help="seconds for the ping-pong to finish, peer included (default 120)")
    _measure_args(x, repeats=10, gap_ms=20.0)
    x.add_argument("--local", action="store_true",
                   help="start both ranks here on loopback (a self-test of the runtime path)")
    _collective_parser(sub)
    for name in ("measure", "self-test"):
        m = sub.add_parser(name, help="measure the link to a server" if name == "measure"
                           else "server and client on loopback")
        if name == "measure":
            m.add_argument("server", type=o.host_port(DEFAULT_PORT),
                           help="HOST[:PORT] of a `profile-link serve`")
        m.add_argument("--timeout", type=o.seconds(MAX_TIMEOUT_S), default=60.0,
                       help="the whole measurement must finish within this (default 60 s)")
        _measure_args(m, repeats=15, gap_ms=0.0)
    return ap


def _collective_parser(sub) -> None:
    """`profile-link collective`: the all-reduce of a tensor-parallel group (profile_collective)."""
    c = sub.add_parser("collective", help="all-reduce (all_sum) over a group of nodes, at the "
                       "sizes a tensor-parallel decode step and prefill sum; per group into the "
                       "cluster file")
    c.add_argument("--nodes", type=o.text("node ids"), default=None,
                   help="the group's node ids in rank order, comma-separated (e.g. a,b,c)")
    c.add_argument("--local", action="store_true",
                   help="start every rank here on loopback (a self-test of the runtime path)")
    c.add_argument("--hostfile", type=o.path("hostfile"),
                   help="ring hostfile, one [\"ip:port\"] per rank; run one command per host")
    c.add_argument("--rank", type=o.int_in(0, 4095), help="this host's rank (0 reports)")
    c.add_argument("--rank-from-env", action="store_true", help=argparse.SUPPRESS)
    c.add_argument("--sizes", type=o.json_sizes(MAX_MESSAGE), default=None, help=argparse.SUPPRESS)
    c.add_argument("--backend", type=o.text("backend"), default="ring", help=argparse.SUPPRESS)
    c.add_argument("--timeout", type=o.seconds(MAX_TIMEOUT_S), default=180.0,
                   help="seconds for the whole measurement, every rank included (default 180)")
    _message_args(c, "prompt length: the prefill all-reduce's tokens (default 128)")
    c.add_argument("--repeats", type=o.positive_int(10000), default=10)
    c.add_argument("--gap-ms", type=o.float_in(0, 60000), default=5.0,
                   help="idle time before each timed all-reduce (default 5)")
    c.add_argument("--busy-ms", type=o.float_in(0, 60000), default=0.0,
                   help="compute this long before each timed all-reduce, as a rank computes "
                   "its share of a block (default 0; under CPU quotas give about that time)")
    c.add_argument("--cluster", type=o.path("cluster file"), default=None,
                   help="cluster JSON to write the group's entry into (needs --nodes)")
    c.add_argument("--json", action="store_true")


def _main_collective(args) -> int:
    """Measure (locally, or this host's rank of a multi-host group) and write rank 0's entry."""
    import os

    from exo_bridge import profile_collective as pc

    if args.rank_from_env:  # a rank started by measure_collective (which bounds it)
        sizes = sorted(set((args.sizes or {}).values()))
        res = pc.rank_program(sizes, args.repeats, 2, args.gap_ms / 1e3, args.backend,
                              args.busy_ms / 1e3)
        if res is not None:
            print(pc.COLL_TAG + json.dumps(res), flush=True)
        os._exit(0)
    nodes = [x.strip() for x in (args.nodes or "").split(",") if x.strip()]
    if args.cluster and not nodes:
        raise UserError("--cluster needs --nodes A,B,... (the group's node ids in rank order)")
    if len(set(nodes)) != len(nodes):
        raise UserError(f"--nodes {args.nodes}: a node is named twice; give each once")
    if args.cluster:
        pc.read_cluster_for_group(args.cluster, nodes)  # refuse a bad file before measuring
    sizes = pc.collective_sizes(args.hidden, args.dtype_bytes, args.prompt_tokens)
    if sizes[-1] > MAX_MESSAGE:
        raise UserError(f"--prompt-tokens {args.prompt_tokens} x --hidden {args.hidden} x "
                        f"--dtype-bytes {args.dtype_bytes} = {sizes[-1]} bytes per message, "
                        f"more than {MAX_MESSAGE} (1 GiB); lower --prompt-tokens")
    if args.local:
        if len(nodes) < 2:
            raise UserError("--local needs --nodes with at least 2 node ids (one rank each)")
        res = pc.measure_collective(len(nodes), sizes, repeats=args.repeats,
                                    gap_ms=args.gap_ms, timeout_s=args.timeout,
                                    busy_ms=args.busy_ms)
    else:
        if not args.hostfile or args.rank is None:
            raise UserError("profile-link collective needs --hostfile FILE and --rank N on "
                            "each host (or --local)")
        out = run_rank("collective", args.rank, args.hostfile,
                       pc.rank_args(sizes, args.repeats, args.gap_ms, "ring", args.busy_ms),
                       args.timeout, "are the other ranks running, with the same hostfile?")
        res = tagged(out[0], pc.COLL_TAG)
        if res is None:
            os._exit(0)  # not rank 0: rank 0 reports
        if nodes and len(nodes) != res["k"]:
            raise UserError(f"--nodes names {len(nodes)} nodes, the hostfile {res['k']} ranks; "
                            "give one node per rank, in rank order")
    entry = pc.entry_from(res, nodes or [f"rank{r}" for r in range(res["k"])], "ring")
    if args.cluster:
        pc.write_collective(args.cluster, entry)
    if args.json:
        print(json.dumps({"collective": entry, "written": bool(args.cluster)}, indent=1),
              flush=True)
    else:
        print(pc.report(entry), flush=True)
        if args.cluster:
            print(f"wrote collective {','.join(nodes)} into {args.cluster}", flush=True)
    os._exit(0)


def check_sizes(args) -> dict[str, int]:
    """The messages to send; the prompt's must fit one message (MAX_MESSAGE bytes)."""
    sizes = activation_sizes(args.hidden, args.dtype_bytes, args.prompt_tokens)
    if sizes["prompt"] > MAX_MESSAGE:
        raise UserError(f"--prompt-tokens {args.prompt_tokens} x --hidden {args.hidden} x "
                        f"--dtype-bytes {args.dtype_bytes} = {sizes['prompt']} bytes per message, "
                        f"more than {MAX_MESSAGE} (1 GiB); lower --prompt-tokens")
    return sizes


def _report(m: LinkMeasurement) -> str:
    lines = [f"link to {m.host}: latency {m.latency_ms:.3f} ms one-way, "
             f"bandwidth {m.bandwidth_gbps:.3f} Gbit/s"]
    for label, d in m.sizes.items():
        model = m.one_way_s(d["bytes"]) * 1e3
        lines.append(f"  {label:<7} {d['bytes']:>10} B  rtt {d['rtt_ms']:8.3f} ms "
                     f"(min {d['rtt_min_ms']:.3f}, max {d['rtt_max_ms']:.3f})  "
                     f"one-way {d['one_way_ms']:8.3f} ms  model {model:8.3f} ms")
    return "\n".join(lines)


@guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "collective":
        return _main_collective(args)
    if args.cmd == "serve":
        print(f"profile-link: serving on {args.host}:{args.port} (Ctrl-C stops)", flush=True)
        serve(args.host, args.port, once=args.once)
        return 0
    if args.cluster and not (args.src and args.dst):
        raise UserError("--cluster needs --from NODE and --to NODE")
    if args.cluster and not getattr(args, "rank_from_env", False):
        read_cluster_for_link(args.cluster, args.src, args.dst)  # refuse a bad file before measuring
    sizes = check_sizes(args)
    if args.cmd == "mlx":
        return _main_mlx(args, sizes)
    stop = None
    if args.cmd == "self-test":
        port, stop = serve_in_thread()
        host = "127.0.0.1"
    else:
        host, port = args.server
    try:
        m = measure(host, port, sizes, repeats=args.repeats, gap_s=args.gap_ms / 1e3,
                    timeout_s=args.timeout)
    finally:
        if stop is not None:
            stop.set()
    entry = write_link(args.cluster, args.src, args.dst, m, args.both_ways) if args.cluster \
        else None
    if args.json:
        print(json.dumps({"measurement": asdict(m), "written": entry}, indent=1))
    else:
        print(_report(m))
        if entry:
            print(f"wrote link {args.src} -> {args.dst} into {args.cluster}")
    return 0


def _main_mlx(args, sizes: dict[str, int]) -> int:
    import os

    if args.sizes:
        sizes = args.sizes
    if args.rank_from_env:  # a rank started by measure_mlx_local (which bounds it too)
        table = mlx_pingpong(sizes, repeats=args.repeats, gap_s=args.gap_ms / 1e3)
        if table is not None:
            print(MLX_TAG + json.dumps(table), flush=True)
        os._exit(0)
    if args.local:
        m = measure_mlx_local(sizes, repeats=args.repeats, gap_ms=args.gap_ms,
                              timeout_s=args.timeout)
    else:
        if not args.hostfile or args.rank is None:
            raise UserError("profile-link mlx needs --hostfile FILE and --rank 0|1 (or --local)")
        out, _ = run_rank("mlx", args.rank, args.hostfile,
                          _mlx_rank_args(sizes, args.repeats, args.gap_ms), args.timeout,
                          "is the other rank running, with the same hostfile?")
        table = tagged(out, MLX_TAG)
        if table is None:
            os._exit(0)  # rank 1: rank 0 reports
        m = _summarise(table, "mx.distributed ring", args.repeats,
                       "mx.distributed send/recv ping-pong (the runner's path), median")
    entry = write_link(args.cluster, args.src, args.dst, m, args.both_ways) if args.cluster \
        else None
    if args.json:
        print(json.dumps({"measurement": asdict(m), "written": entry}, indent=1), flush=True)
    else:
        print(_report(m), flush=True)
        if entry:
            print(f"wrote link {args.src} -> {args.dst} into {args.cluster}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
