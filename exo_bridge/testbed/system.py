"""The host side: can a testbed run here, shell steps, and removing / listing what a prefix
left behind (namespaces and cgroups), by name."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from exo_bridge.testbed.spec import CGROUP_CPU, DEFAULT_PREFIX, TestbedError

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

