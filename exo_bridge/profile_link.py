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

from profiler.costtable import atomic_write_json
from profiler.errors import UserError, guard

DEFAULT_PORT = 52900
_HDR = struct.Struct("!QI")  # payload bytes, reply bytes


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


def _handle(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    hdr = bytearray(_HDR.size)
    with conn:
        while True:
            if not _drain_into(conn, hdr):
                return
            n, reply = _HDR.unpack(bytes(hdr))
            if not _drain(conn, n, buf):
                return
            conn.sendall(b"\0" * reply)


def _drain_into(conn: socket.socket, out: bytearray) -> bool:
    view = memoryview(out)
    got = 0
    while got < len(out):
        k = conn.recv_into(view[got:])
        if k == 0:
            return False
        got += k
    return True


def serve(host: str = "0.0.0.0", port: int = DEFAULT_PORT, stop: threading.Event | None = None,
          ready: threading.Event | None = None, once: bool = False) -> int:
    """Answer ping-pongs until `stop` is set (or after one client with `once`). Returns the port."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(4)
    srv.settimeout(0.2)
    if ready is not None:
        ready.port = srv.getsockname()[1]  # type: ignore[attr-defined]
        ready.set()
    try:
        while stop is None or not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            conn.settimeout(None)
            if once:
                _handle(conn)
                break
            threading.Thread(target=_handle, args=(conn,), daemon=True).start()
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


def _pingpong(sock: socket.socket, payload: bytes, reply: int = 1) -> float:
    t0 = time.perf_counter()
    sock.sendall(_HDR.pack(len(payload), reply) + payload)
    got = 0
    while got < reply:
        chunk = sock.recv(reply - got)
        if not chunk:
            raise UserError("the profile-link server closed the connection")
        got += len(chunk)
    return time.perf_counter() - t0


def measure(host: str, port: int = DEFAULT_PORT, sizes: dict[str, int] | None = None,
            repeats: int = 15, warmup: int = 3, timeout_s: float = 30.0,
            gap_s: float = 0.0) -> LinkMeasurement:
    """Ping-pong each size `repeats` times over one connection; median RTT per size.

    gap_s: idle time before each ping-pong (the pipeline's pattern: a message per token after
    compute; with TCP slow-start-after-idle a gap makes big messages slower).
    """
    sizes = dict(sizes or {"token": 8192, "prompt": 8192 * 128})
    sizes = {"ping": 1, **sizes}
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        raise UserError(f"cannot reach a profile-link server at {host}:{port} ({e.strerror or e}); "
                        f"start one there with `profile-link serve --port {port}`") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    table: dict[str, dict[str, float]] = {}
    with sock:
        for label, n in sizes.items():
            payload = b"\x01" * int(n)
            for _ in range(warmup):
                _pingpong(sock, payload)
            rtts = []
            for _ in range(repeats):
                if gap_s:
                    time.sleep(gap_s)
                rtts.append(_pingpong(sock, payload))
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
    import os
    import subprocess
    import tempfile

    tmp = None
    if hostfiles is None:
        from exo_bridge.runner.run import free_ports

        ports = free_ports(2)
        fd, tmp = tempfile.mkstemp(prefix="profile-link-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump([[f"127.0.0.1:{p}"] for p in ports], f)
        hostfiles = [tmp, tmp]
    procs = []
    try:
        for r in range(2):
            env = dict(os.environ, MLX_HOSTFILE=hostfiles[r], MLX_RANK=str(r))
            cmd = (wrappers[r] if wrappers else []) + [
                sys.executable, "-m", "exo_bridge.profile_link", "mlx", "--rank-from-env",
                "--sizes", json.dumps(sizes), "--repeats", str(repeats), "--gap-ms", str(gap_ms)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=timeout_s))
            except subprocess.TimeoutExpired:
                raise UserError(f"profile-link mlx timed out after {timeout_s:.0f} s") from None
        for p, (o, e) in zip(procs, outs):
            if p.returncode != 0:
                raise UserError(f"profile-link mlx rank failed: {e.strip()[-800:]}")
        line = [ln for ln in outs[0][0].splitlines() if ln.startswith(MLX_TAG)]
        if not line:
            raise UserError(f"profile-link mlx printed no result: {outs[0][1].strip()[-800:]}")
        d = json.loads(line[0][len(MLX_TAG):])
        return _summarise(d, "mx.distributed ring", repeats,
                          f"mx.distributed send/recv ping-pong (the runner's path), "
                          f"{gap_ms:g} ms idle before each, median")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if tmp:
            os.unlink(tmp)


def activation_sizes(hidden: int, dtype_bytes: int, prompt_tokens: int) -> dict[str, int]:
    return {"token": hidden * dtype_bytes, "prompt": prompt_tokens * hidden * dtype_bytes}


# ---------------------------------------------------------------------------- cluster file


def write_link(cluster_path: str | Path, src: str, dst: str, m: LinkMeasurement,
               both_ways: bool = False) -> dict[str, Any]:
    """Put the measurement into the cluster file's `links` (replacing src->dst), atomically."""
    path = Path(cluster_path)
    if not path.exists():
        raise UserError(f"cluster file {path}: no such file")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise UserError(f"cluster file {path}: expected a JSON object")
    ids = {n.get("id") for n in data.get("nodes", []) if isinstance(n, dict)}
    for x in (src, dst):
        if ids and x not in ids:
            raise UserError(f"cluster file {path}: no node {x!r} (nodes: {', '.join(sorted(ids))})")
    entry = {"from": src, "to": dst, "latency_ms": round(m.latency_ms, 4),
             "bandwidth_gbps": round(m.bandwidth_gbps, 6),
             "measured": {"by": "profile-link", "sizes": m.sizes, "repeats": m.repeats,
                          "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    if both_ways:
        entry["both_ways"] = True
    links = [lk for lk in data.get("links", []) if not (
        (lk.get("from"), lk.get("to")) == (src, dst)
        or (both_ways and (lk.get("from"), lk.get("to")) == (dst, src)))]
    links.append(entry)
    data["links"] = links
    atomic_write_json(path, data)
    return entry


# -------------------------------------------------------------------------------------- CLI


def _hostport(s: str) -> tuple[str, int]:
    if ":" in s:
        h, p = s.rsplit(":", 1)
        return h, int(p)
    return s, DEFAULT_PORT


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="profile-link", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer ping-pongs (run on the receiving host)")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--once", action="store_true", help="exit after one client")
    x = sub.add_parser("mlx", help="mx.distributed ping-pong, one of the two ranks (run one on "
                       "each host with the same ring hostfile, rank 0 reports)")
    x.add_argument("--hostfile", help="ring hostfile [[\"ip:port\"], [\"ip:port\"]]")
    x.add_argument("--rank", type=int, help="this host's rank (0 reports)")
    x.add_argument("--rank-from-env", action="store_true", help=argparse.SUPPRESS)
    x.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    x.add_argument("--hidden", type=int, default=4096)
    x.add_argument("--dtype-bytes", type=int, default=2)
    x.add_argument("--prompt-tokens", type=int, default=128)
    x.add_argument("--repeats", type=int, default=10)
    x.add_argument("--gap-ms", type=float, default=20.0)
    x.add_argument("--cluster", default=None)
    x.add_argument("--from", dest="src", default=None)
    x.add_argument("--to", dest="dst", default=None)
    x.add_argument("--both-ways", action="store_true")
    x.add_argument("--json", action="store_true")
    x.add_argument("--local", action="store_true",
                   help="start both ranks here on loopback (a self-test of the runtime path)")
    for name in ("measure", "self-test"):
        m = sub.add_parser(name, help="measure the link to a server" if name == "measure"
                           else "server and client on loopback")
        if name == "measure":
            m.add_argument("server", help="HOST[:PORT] of a `profile-link serve`")
        m.add_argument("--hidden", type=int, default=4096, help="model hidden size (default 4096)")
        m.add_argument("--dtype-bytes", type=int, default=2, help="activation bytes (default 2)")
        m.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
        m.add_argument("--repeats", type=int, default=15)
        m.add_argument("--gap-ms", type=float, default=0.0,
                       help="idle time before each ping-pong (the pipeline's pattern)")
        m.add_argument("--cluster", default=None, help="cluster JSON to write the link into")
        m.add_argument("--from", dest="src", default=None, help="link source node id")
        m.add_argument("--to", dest="dst", default=None, help="link destination node id")
        m.add_argument("--both-ways", action="store_true", help="the link is symmetric")
        m.add_argument("--json", action="store_true")
    return ap


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
    if args.cmd == "serve":
        print(f"profile-link: serving on {args.host}:{args.port} (Ctrl-C stops)", flush=True)
        serve(args.host, args.port, once=args.once)
        return 0
    if args.cluster and not (args.src and args.dst):
        raise UserError("--cluster needs --from NODE and --to NODE")
    sizes = activation_sizes(args.hidden, args.dtype_bytes, args.prompt_tokens)
    if args.cmd == "mlx":
        return _main_mlx(args, sizes)
    stop = None
    if args.cmd == "self-test":
        port, stop = serve_in_thread()
        host = "127.0.0.1"
    else:
        host, port = _hostport(args.server)
    try:
        m = measure(host, port, sizes, repeats=args.repeats, gap_s=args.gap_ms / 1e3)
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
        sizes = json.loads(args.sizes)
    if args.rank_from_env:  # a rank started by measure_mlx_local
        table = mlx_pingpong(sizes, repeats=args.repeats, gap_s=args.gap_ms / 1e3)
        if table is not None:
            print(MLX_TAG + json.dumps(table), flush=True)
        os._exit(0)
    if args.local:
        m = measure_mlx_local(sizes, repeats=args.repeats, gap_ms=args.gap_ms)
    else:
        if not args.hostfile or args.rank is None:
            raise UserError("profile-link mlx needs --hostfile FILE and --rank 0|1 (or --local)")
        os.environ.update(MLX_HOSTFILE=args.hostfile, MLX_RANK=str(args.rank))
        table = mlx_pingpong(sizes, repeats=args.repeats, gap_s=args.gap_ms / 1e3)
        if table is None:
            os._exit(0)
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
