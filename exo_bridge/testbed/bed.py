"""The Testbed: build the namespaces, veths, bridge and cgroups of a TestbedSpec, run programs
in a node (`wrapper`), wire a ring of ranks through the link relay (`ring`), measure a link,
and remove everything on exit, signal or failure (see exo_bridge.testbed)."""

from __future__ import annotations

import atexit
import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from exo_bridge.testbed.spec import (CGROUP_CPU, HUB_IP, SHARES, SUBNET, TestbedError,
                                     TestbedSpec, cfs_period_quota)
from exo_bridge.testbed.system import _safe, _sh, available, status, teardown

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
                                                   "exo_bridge.testbed.relay", "--routes", b64],
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

