"""What an emulated cluster is: nodes (a CPU share each), directed links, and how a CPU share
becomes a CFS period and quota. Also the command-line forms of both (`fast:0.5`, `a-b:2ms:100mbit`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from profiler.errors import UserError

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

