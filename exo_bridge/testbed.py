"""An emulated heterogeneous cluster on one Linux machine (root): slow nodes, slow links, real TCP.

Each node is a network namespace `{prefix}-{node}` with one veth (`eth0`, 10.77.0.{i+1}/24)
plugged into a bridge inside a hub namespace `{prefix}-hub` (10.77.0.254), and a cgroup v1 CPU
group `/sys/fs/cgroup/cpu/{prefix}-{node}` whose `cfs_quota_us / cfs_period_us` is the node's
share of a core (0.5 = half-speed single-threaded MLX), with a short period (2-4 ms, see
`cfs_period_quota`) so that a node is as slow after idling as under continuous load. Nothing is created outside those
namespaces and cgroups, and nothing talks to any address but 10.77.0.0/24 inside them.

Links. `tc netem` is the usual tool, but kernels without `sch_netem` exist (this project's CI VM
has htb/tbf only), so links are emulated by a small relay in the hub namespace, one listening
port per directed connection: bytes read at time t from the sender go out at
`start = max(t, link_free); link_free = start + n / rate; deliver = link_free + latency`,
which is netem's "delay D rate R" per chunk. MLX's ring backend reads its hostfile per process,
so each rank gets its own hostfile in which its neighbours' addresses are the relay's ports for
(this rank -> neighbour); its own entry is its real address, where it listens. `profile-link`
measures the same relayed path, so a link's measured latency includes the relay's own overhead
(tens of microseconds), exactly as the runner sees it.

Lifetime: `with Testbed(spec) as tb:` creates everything and removes it on exit, on Ctrl-C /
SIGTERM / SIGHUP (signal handlers) and on failure; `atexit` covers the rest, and
`python -m exo_bridge.testbed down` removes anything left with the prefix (after a kill -9).

    python -m exo_bridge.testbed up --nodes fast:1.0,mid:0.5,slow:0.25 \\
        --link fast-mid:2ms:200mbit --default-link 5ms:100mbit      # holds until Ctrl-C
    python -m exo_bridge.testbed status
    python -m exo_bridge.testbed down
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from profiler.errors import UserError, guard

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
SUBNET = "10.77.0"
HUB_IP = f"{SUBNET}.254"
DEFAULT_PREFIX = "xb"
# CFS period. A quota is not a slower CPU: after idling, a node runs at full speed until it has
# used its quota (cpu x period) of the current period. Pipeline nodes idle while the others
# compute, so with the usual 100 ms period a half-speed node runs a 40 ms stage at FULL speed,
# faster than its profile (taken under continuous load). Measured here (a 8 ms job, cpu 0.5):
# period 100 ms: 7.6 ms continuous, 8.1 ms after idle (no slowdown at all); 10 ms: 19.1 / 9.0;
# 2 ms: 16.9 / 17.2 (the same in both patterns, as a slower CPU would be). The kernel refuses a
# quota under 1 ms, so the period is the shortest that keeps the quota >= 1 ms, at least 2 ms.
MIN_PERIOD_US = 2_000
MIN_QUOTA_US = 1_000


def cfs_period_quota(cpu: float) -> tuple[int, int]:
    """(period_us, quota_us) for a share of one core; quota -1 (none) for cpu <= 0."""
    if cpu <= 0:
        return 100_000, -1
    period = max(MIN_PERIOD_US, int(-(-MIN_QUOTA_US // cpu)))
    period = min(period, 1_000_000)
    return period, max(MIN_QUOTA_US, int(round(cpu * period)))
# cpu.shares of our groups (the default is 1024 per group / per root task). Other work on the
# machine would otherwise take CPU from a node in the middle of its stage and the measured times
# would no longer be the node's; a high weight keeps the emulated cluster isolated while the
# quota still caps each node.
SHARES = 100_000


class TestbedError(UserError):
    """The testbed cannot be built here (not root, no netns, no cgroup) or a step failed."""

    __test__ = False


@dataclass
class NodeSpec:
    id: str
    cpu: float = 1.0  # share of one core (cfs quota / period); 0 or less = no quota


@dataclass
class LinkSpec:
    src: str
    dst: str
    latency_ms: float
    rate_mbit: float  # megabits per second
    both_ways: bool = True


@dataclass
class TestbedSpec:
    __test__ = False
    nodes: list[NodeSpec]
    links: list[LinkSpec] = field(default_factory=list)
    default_latency_ms: float = 1.0
    default_rate_mbit: float = 1000.0
    prefix: str = DEFAULT_PREFIX

    def link(self, a: str, b: str) -> tuple[float, float]:
        """(latency_ms, rate_mbit) of the directed link a -> b."""
        for lk in self.links:
            if (lk.src, lk.dst) == (a, b) or (lk.both_ways and (lk.dst, lk.src) == (a, b)):
                return lk.latency_ms, lk.rate_mbit
        return self.default_latency_ms, self.default_rate_mbit


def available() -> str | None:
    """None when the testbed can run here, else the reason it cannot (for skips and errors)."""
    if sys.platform != "linux":
        return "the testbed needs Linux (network namespaces, cgroups)"
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, veth, cgroups)"
    if not (CGROUP_CPU / "cgroup.procs").exists():
        return f"no cgroup v1 cpu controller at {CGROUP_CPU}"
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists() and not any(
            (p / "cpu.cfs_quota_us").exists() for p in CGROUP_CPU.iterdir() if p.is_dir()):
        return "the cpu cgroup has no CFS quota (kernel without CONFIG_CFS_BANDWIDTH)"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "`ip netns` is not available (iproute2)"
    if _PROBE:
        return _PROBE[0]
    # root in a container may still lack CAP_NET_ADMIN or a writable cgroup tree: try for real
    name = f"xbprobe{os.getpid()}"
    why = None
    cp = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if cp.returncode != 0:
        why = f"cannot create a network namespace ({cp.stderr.strip()})"
    else:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        try:
            (CGROUP_CPU / name).mkdir()
            (CGROUP_CPU / name).rmdir()
        except OSError as e:
            why = f"cannot create a cpu cgroup under {CGROUP_CPU} ({e.strerror})"
    _PROBE.append(why)
    return why


_PROBE: list = []


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    cp = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and cp.returncode != 0:
        raise TestbedError(f"`{' '.join(cmd)}` failed: {cp.stderr.strip() or cp.stdout.strip()}")
    return cp


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if not s:
        raise TestbedError(f"node id {name!r} has no usable characters")
    return s


# ------------------------------------------------------------------------------- the relay


def _pipe(src: socket.socket, dst: socket.socket, latency_s: float, rate_Bps: float) -> None:
    """Copy src -> dst with netem-like 'delay latency rate rate' per chunk (two threads)."""
    q: queue.Queue = queue.Queue()

    def reader():
        free_at = 0.0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                now = time.monotonic()
                start = max(now, free_at)
                free_at = start + (len(data) / rate_Bps if rate_Bps > 0 else 0.0)
                q.put((free_at + latency_s, data))
        except OSError:
            pass
        q.put(None)

    def writer():
        try:
            while True:
                item = q.get()
                if item is None:
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()


def _serve_route(lsock: socket.socket, route: dict[str, Any]) -> None:
    tgt = tuple(route["target"])
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        deadline = time.monotonic() + 120
        while True:  # the target may not listen yet (ranks start together): retry
            try:
                out = socket.create_connection(tgt, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    conn.close()
                    out = None
                    break
                time.sleep(0.05)
        if out is None:
            continue
        out.settimeout(None)
        for s in (conn, out):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _pipe(conn, out, route["fwd"][0], route["fwd"][1])
        _pipe(out, conn, route["back"][0], route["back"][1])


def relay_main(routes: list[dict[str, Any]]) -> None:
    """Run the relay: each route {listen: [ip, port], target: [ip, port], fwd: [lat_s, Bps],
    back: [lat_s, Bps]}. Prints 'ready' once every port listens; runs until killed."""
    socks = []
    for r in routes:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(tuple(r["listen"]))
        s.listen(8)
        socks.append(s)
    for s, r in zip(socks, routes):
        threading.Thread(target=_serve_route, args=(s, r), daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


# ----------------------------------------------------------------------------- the testbed


@dataclass
class RingSetup:
    """What the runner needs to run ranks on testbed nodes in one ring order."""

    nodes: list[str]
    hosts: list[str]
    hostfiles: list[str]
    wrappers: list[list[str]]


class Testbed:
    """Build, use and remove the emulated cluster; a context manager (see module docstring)."""

    __test__ = False

    def __init__(self, spec: TestbedSpec, keep_on_exit: bool = False):
        why = available()
        if why:
            raise TestbedError(why)
        ids = [n.id for n in spec.nodes]
        if len(set(ids)) != len(ids) or not ids:
            raise TestbedError(f"node ids must be unique and non-empty: {ids}")
        if len(ids) > 200:
            raise TestbedError("at most 200 nodes")
        self.spec = spec
        self.prefix = _safe(spec.prefix)
        self.keep_on_exit = keep_on_exit
        self.index = {n.id: i for i, n in enumerate(spec.nodes)}
        self._procs: list[subprocess.Popen] = []
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-testbed-"))
        self._old_handlers: dict[int, Any] = {}
        self._up = False

    # names
    def ns(self, node: str) -> str:
        return f"{self.prefix}-{_safe(node)}"

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def ip(self, node: str) -> str:
        return f"{SUBNET}.{self.index[node] + 1}"

    def cgroup(self, node: str) -> Path:
        return CGROUP_CPU / self.ns(node)

    @property
    def net_cgroup(self) -> Path:
        return CGROUP_CPU / f"{self.prefix}-net"

    # lifecycle
    def __enter__(self) -> "Testbed":
        self._install_signals()
        atexit.register(self.down)
        try:
            self.up()
        except BaseException:
            self.down()
            self._restore_signals()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if not self.keep_on_exit:
                self.down()
        finally:
            self._restore_signals()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.down()
            self._restore_signals()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[s] = signal.signal(s, handler)

    def _restore_signals(self) -> None:
        for s, h in self._old_handlers.items():
            try:
                signal.signal(s, h)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()

    def up(self) -> None:
        """Create the hub, one namespace + veth + cgroup per node. Fails if the prefix is in use."""
        existing = _sh("ip", "netns", "list").stdout
        if re.search(rf"^{re.escape(self.hub)}\b", existing, re.M):
            raise TestbedError(f"a testbed with prefix {self.prefix!r} exists; run "
                               f"`python -m exo_bridge.testbed down --prefix {self.prefix}`")
        self._up = True
        _sh("ip", "netns", "add", self.hub)
        _sh("ip", "-n", self.hub, "link", "set", "lo", "up")
        _sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
        _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for n in self.spec.nodes:
            i, ns = self.index[n.id], self.ns(n.id)
            peer = f"{self.prefix[:6]}-v{i}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer,
                "netns", self.hub)
            _sh("ip", "-n", ns, "addr", "add", f"{self.ip(n.id)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", self.hub, "link", "set", peer, "master", "br0")
            _sh("ip", "-n", self.hub, "link", "set", peer, "up")
            cg = self.cgroup(n.id)
            cg.mkdir(exist_ok=True)
            period, quota = cfs_period_quota(n.cpu)
            (cg / "cpu.cfs_quota_us").write_text("-1")  # period and quota must stay in step
            (cg / "cpu.cfs_period_us").write_text(str(period))
            (cg / "cpu.cfs_quota_us").write_text(str(quota))
            (cg / "cpu.shares").write_text(str(SHARES))
        net = self.net_cgroup  # the link relay and profile-link: high weight, no quota
        net.mkdir(exist_ok=True)
        (net / "cpu.shares").write_text(str(SHARES))

    def _stop(self, proc: subprocess.Popen) -> None:
        """Kill a helper process this testbed started (its whole group) and forget it."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        self._procs.remove(proc)

    def down(self) -> None:
        """Remove everything this testbed made; safe to call twice and after a partial up()."""
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self._procs.clear()
        if self._up:
            teardown(self.prefix, [self.ns(n.id) for n in self.spec.nodes] + [self.hub])
            self._up = False
        for f in self._tmp.glob("*"):
            f.unlink(missing_ok=True)
        try:
            self._tmp.rmdir()
        except OSError:
            pass

    # using it
    def wrapper(self, node: str | None, cgroup: bool = True) -> list[str]:
        """Command prefix that runs a program in the node's cgroup and namespace (node None:
        the hub). cgroup=False uses the network helpers' group (no quota) instead.

        The cgroup is joined first: `ip netns exec` remounts /sys, which hides /sys/fs/cgroup.
        """
        cg = self.cgroup(node) if (cgroup and node is not None) else self.net_cgroup
        ns = self.ns(node) if node is not None else self.hub
        inner = f'echo $$ > {cg}/cgroup.procs && exec ip netns exec "$0" "$@"'
        return ["sh", "-c", inner, ns]

    def _start_relay(self, routes: list[dict[str, Any]]) -> subprocess.Popen:
        b64 = base64.b64encode(json.dumps(routes).encode()).decode()
        p = subprocess.Popen(self.wrapper(None) + [sys.executable, "-m",
                                                   "exo_bridge.testbed", "relay", "--routes", b64],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        self._procs.append(p)
        line = p.stdout.readline()
        if line.strip() != "ready":
            err = p.stderr.read() if p.poll() is not None else ""
            raise TestbedError(f"the link relay did not start: {line.strip()} {err.strip()}")
        return p

    def _route(self, a: str, b: str, port: int, target_port: int) -> dict[str, Any]:
        la, ra = self.spec.link(a, b)
        lb, rb = self.spec.link(b, a)
        return {"listen": [HUB_IP, port], "target": [self.ip(b), target_port],
                "fwd": [la / 1e3, ra * 1e6 / 8], "back": [lb / 1e3, rb * 1e6 / 8]}

    @contextmanager
    def ring(self, nodes: list[str], base_port: int | None = None) -> Iterator[RingSetup]:
        """Per-rank hostfiles whose neighbour entries go through the link relay; relay lives
        for the `with` block."""
        for n in nodes:
            if n not in self.index:
                raise TestbedError(f"node {n!r} is not in the testbed ({', '.join(self.index)})")
        k = len(nodes)
        base = base_port or random.randint(20000, 40000)
        real = {r: base + r for r in range(k)}  # where rank r listens (its own namespace)
        routes, relay_port = [], {}
        rp = base + 1000
        for r in range(k):
            for nb in sorted({(r + 1) % k, (r - 1) % k} - {r}):
                relay_port[r, nb] = rp
                routes.append(self._route(nodes[r], nodes[nb], rp, real[nb]))
                rp += 1
        hostfiles = []
        for r in range(k):
            entries = []
            for q in range(k):
                if q == r:
                    entries.append([f"{self.ip(nodes[r])}:{real[r]}"])
                elif (r, q) in relay_port:
                    entries.append([f"{HUB_IP}:{relay_port[r, q]}"])
                else:  # not a neighbour: never contacted by the ring, keep the real address
                    entries.append([f"{self.ip(nodes[q])}:{real[q]}"])
            path = self._tmp / f"hostfile-{base}-{r}.json"
            path.write_text(json.dumps(entries))
            hostfiles.append(str(path))
        relay = self._start_relay(routes) if routes else None
        try:
            yield RingSetup(nodes=list(nodes), hosts=[self.ip(n) for n in nodes],
                            hostfiles=hostfiles, wrappers=[self.wrapper(n) for n in nodes])
        finally:
            if relay is not None:
                self._stop(relay)
            for h in hostfiles:
                Path(h).unlink(missing_ok=True)

    def measure_link(self, a: str, b: str, hidden: int, dtype_bytes: int, prompt_tokens: int,
                     repeats: int = 10, gap_ms: float = 0.0) -> dict[str, Any]:
        """profile-link over the emulated path a -> b (server in b, client in a, via the relay)."""
        port = 52900
        srv = subprocess.Popen(self.wrapper(b, cgroup=False) + [
            sys.executable, "-m", "exo_bridge.profile_link", "serve", "--host", self.ip(b),
            "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        self._procs.append(srv)
        relay = None
        try:
            srv.stdout.readline()  # "serving on ..."
            relay = self._start_relay([self._route(a, b, 52901, port)])
            cp = subprocess.run(self.wrapper(a, cgroup=False) + [
                sys.executable, "-m", "exo_bridge.profile_link", "measure", f"{HUB_IP}:52901",
                "--hidden", str(hidden), "--dtype-bytes", str(dtype_bytes), "--prompt-tokens",
                str(prompt_tokens), "--repeats", str(repeats), "--gap-ms", str(gap_ms),
                "--json"], capture_output=True, text=True, timeout=300)
            if cp.returncode != 0:
                raise TestbedError(f"profile-link {a} -> {b} failed: {cp.stderr.strip()}")
            return json.loads(cp.stdout)["measurement"]
        finally:
            for p in (srv, relay):
                if p is not None:
                    self._stop(p)

    def measure_link_mlx(self, a: str, b: str, hidden: int, dtype_bytes: int,
                         prompt_tokens: int, repeats: int = 10, gap_ms: float = 20.0
                         ) -> dict[str, Any]:
        """`profile-link mlx` over a -> b: two mx.distributed ranks in the nodes' namespaces AND
        cgroups, through the link relay, with the runner's send / select / recv path; so the
        latency includes the runtime's per-message cost and waking a rank under its quota."""
        from exo_bridge.profile_link import activation_sizes, measure_mlx_local

        with self.ring([a, b]) as ring:
            m = measure_mlx_local(activation_sizes(hidden, dtype_bytes, prompt_tokens),
                                  hostfiles=ring.hostfiles, wrappers=ring.wrappers,
                                  repeats=repeats, gap_ms=gap_ms)
        return asdict(m)

    def status(self) -> dict[str, Any]:
        return status(self.prefix)


# ------------------------------------------------------------------ teardown / status by name


def _our_namespaces(prefix: str) -> list[str]:
    out = _sh("ip", "netns", "list", check=False).stdout
    names = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def _our_cgroups(prefix: str) -> list[Path]:
    if not CGROUP_CPU.exists():
        return []
    return [p for p in CGROUP_CPU.iterdir() if p.is_dir() and p.name.startswith(prefix + "-")]


def teardown(prefix: str = DEFAULT_PREFIX, namespaces: list[str] | None = None) -> list[str]:
    """Kill what runs in our namespaces / cgroups, delete the namespaces (their veths go with
    them) and the cgroups. Returns what was removed."""
    removed = []
    nss = sorted(set((namespaces or []) + _our_namespaces(prefix)))
    existing = set(_our_namespaces(prefix))
    for ns in nss:
        if ns not in existing:
            continue
        pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for cg in _our_cgroups(prefix):
        try:
            for pid in (cg / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        except OSError:
            pass
    time.sleep(0.1)
    for ns in nss:
        if ns in existing:
            _sh("ip", "netns", "delete", ns, check=False)
            removed.append(f"netns {ns}")
    for cg in _our_cgroups(prefix):
        for _ in range(50):
            try:
                cg.rmdir()
                removed.append(f"cgroup {cg}")
                break
            except OSError:
                time.sleep(0.1)
    return removed


def status(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    out: dict[str, Any] = {"namespaces": {}, "cgroups": {}}
    for ns in _our_namespaces(prefix):
        addr = _sh("ip", "-n", ns, "-br", "addr", check=False).stdout.strip()
        out["namespaces"][ns] = addr
    for cg in _our_cgroups(prefix):
        try:
            q = int((cg / "cpu.cfs_quota_us").read_text())
            p = int((cg / "cpu.cfs_period_us").read_text())
            out["cgroups"][cg.name] = {"cpu": (q / p) if q > 0 else None,
                                       "procs": len((cg / "cgroup.procs").read_text().split())}
        except OSError:
            pass
    return out


# -------------------------------------------------------------------------------------- CLI


def parse_nodes(s: str) -> list[NodeSpec]:
    """'fast:1.0,mid:0.5' -> NodeSpecs (cpu share of one core)."""
    out = []
    for part in s.split(","):
        name, _, cpu = part.partition(":")
        try:
            out.append(NodeSpec(name.strip(), float(cpu) if cpu else 1.0))
        except ValueError:
            raise UserError(f"--nodes: {part!r} is not NAME:CPU_SHARE (e.g. slow:0.25)") from None
    return out


def _parse_rate(s: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(gbit|mbit|kbit)?", s.strip().lower())
    if not m:
        raise UserError(f"rate {s!r}: use e.g. 100mbit or 1gbit")
    v = float(m.group(1))
    return v * {"gbit": 1000, "mbit": 1, "kbit": 1e-3, None: 1}[m.group(2)]


def _parse_lat(s: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(ms|us)?", s.strip().lower())
    if not m:
        raise UserError(f"latency {s!r}: use e.g. 2ms or 500us")
    return float(m.group(1)) * (1e-3 if m.group(2) == "us" else 1)


def parse_link(s: str) -> LinkSpec:
    """'a-b:2ms:100mbit' (both ways) or 'a>b:2ms:100mbit' (one way)."""
    try:
        pair, lat, rate = s.split(":")
    except ValueError:
        raise UserError(f"--link {s!r}: use A-B:LATENCY:RATE, e.g. fast-slow:2ms:100mbit") from None
    both = ">" not in pair
    a, b = re.split(r"[->]", pair, maxsplit=1)
    return LinkSpec(a, b, _parse_lat(lat), _parse_rate(rate), both)


@guard
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exo_bridge.testbed",
                                 description="emulated heterogeneous cluster (root)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="build the testbed and hold it until Ctrl-C")
    u.add_argument("--nodes", required=True, help="NAME:CPU,... e.g. fast:1,mid:0.5,slow:0.25")
    u.add_argument("--link", action="append", default=[], help="A-B:LATENCY:RATE (repeatable)")
    u.add_argument("--default-link", default="1ms:1000mbit")
    u.add_argument("--prefix", default=DEFAULT_PREFIX)
    for name in ("down", "status"):
        p = sub.add_parser(name)
        p.add_argument("--prefix", default=DEFAULT_PREFIX)
    r = sub.add_parser("relay", help=argparse.SUPPRESS)
    r.add_argument("--routes", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "relay":
        relay_main(json.loads(base64.b64decode(args.routes)))
        return 0
    if args.cmd == "down":
        removed = teardown(args.prefix)
        print("\n".join(removed) if removed else f"nothing with prefix {args.prefix!r} to remove")
        return 0
    if args.cmd == "status":
        print(json.dumps(status(args.prefix), indent=1))
        return 0
    lat, rate = args.default_link.split(":")
    spec = TestbedSpec(parse_nodes(args.nodes), [parse_link(s) for s in args.link],
                       _parse_lat(lat), _parse_rate(rate), prefix=args.prefix)
    with Testbed(spec) as tb:
        print(json.dumps({"nodes": {n.id: {"ip": tb.ip(n.id), "netns": tb.ns(n.id),
                                           "cpu": n.cpu} for n in spec.nodes},
                          "links": [asdict(lk) for lk in spec.links]}, indent=1))
        print("testbed up; Ctrl-C removes it", flush=True)
        while True:
            time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
