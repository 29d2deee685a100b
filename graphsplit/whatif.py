"""`what-if CLUSTER --add CHIP --link A:B=PRESET`: which machine to add, which cable pays off.

Each hypothetical change is tried on its own, then all of them together, and the best plan of
every variant is printed beside the cluster as it is (the baseline): stages, time per output
token, time to first token, tokens/s, memory, and the gain over the baseline in the
objective. A plan comes from graphsplit's own solver (`make_plan`), so a variant's plan is what
`split-model` would print for that cluster.

* ``--add "M4 Pro 48GB"`` (or ``m4-pro-48gb``, or ``name=M4 Pro 48GB``): a machine that was
  not profiled: a known Apple chip (graphsplit.chips), its cost table the chip's own roofline
  (graphsplit.roofline: an ESTIMATE, marked ``*``). It joins over the cluster's default link
  unless a ``--link`` names it.
* ``--link a:b=tb5`` (or ``a:b=0.3ms,5GB/s``): a cable between two nodes, both directions.
  A link that names an added machine goes with that machine's variants.

Link presets (one-way latency, bandwidth; measure your own with `profile-link`):

=======  =========  ===========  ==========================================================
preset   latency    bandwidth    where the numbers come from
=======  =========  ===========  ==========================================================
tb5      0.15 ms    52 Gbit/s    TCP over Thunderbolt 5: ~0.3 ms round trip, 52-64 Gbit/s
                                 iperf3 (field notes, exo and MLX users); the low end
tb4      0.15 ms    26 Gbit/s    Thunderbolt 4 (40 Gbit/s line rate) at TB5's measured
                                 share of its line rate (52 of 80); latency as TB5
10gbe    0.10 ms    9.4 Gbit/s   10 GbE at 1 GbE's measured share of line rate (941 Mbit/s
                                 iperf3, esnet/iperf#1170); latency nominal
1gbe     0.25 ms    0.94 Gbit/s  941 Mbit/s iperf3 between Macs (esnet/iperf#1170); latency
                                 nominal for a switched LAN
wifi     2.5 ms     0.3 Gbit/s   nominal home Wi-Fi 5/6; measure it, it varies most
=======  =========  ===========  ==========================================================
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

from profiler import options as o
from profiler.errors import UserError, guard

OBJECTIVES = ("latency", "ttft", "throughput")


@dataclass(frozen=True)
class LinkSpec:
    latency_ms: float
    bandwidth_gbps: float  # gigaBITS per second, as in cluster files
    label: str  # the preset's name or the text given
    source: str = ""


PRESETS = {
    "tb5": LinkSpec(0.15, 52.0, "tb5", "TCP over Thunderbolt 5: ~0.3 ms round trip, 52-64 "
                    "Gbit/s iperf3 (field notes); the low end"),
    "tb4": LinkSpec(0.15, 26.0, "tb4", "Thunderbolt 4 line rate 40 Gbit/s x TB5's measured "
                    "52/80 share; latency as TB5"),
    "10gbe": LinkSpec(0.10, 9.4, "10gbe", "10 GbE x 1 GbE's measured 0.941 share of line "
                      "rate (esnet/iperf#1170); latency nominal"),
    "1gbe": LinkSpec(0.25, 0.94, "1gbe", "941 Mbit/s iperf3 (esnet/iperf#1170); latency "
                     "nominal for a switched LAN"),
    "wifi": LinkSpec(2.5, 0.3, "wifi", "nominal home Wi-Fi 5/6; measure it with profile-link"),
}

# -- options ------------------------------------------------------------------------------------

_BAD_NAME = re.compile(r"[\x00-\x1f=:]")


def _bad(msg: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(msg)


def parse_add(text: str) -> tuple[str | None, str]:
    """``CHIP`` or ``NAME=CHIP`` -> (name or None, chip text); the chip must be known."""
    from graphsplit import chips

    name, sep, chip = str(text).rpartition("=")
    if sep and (not name.strip() or _BAD_NAME.search(name)):
        raise _bad(f"{o.shown(text)}: give NAME=CHIP with a plain node name, e.g. "
                   "mini2=M4 Pro 48GB")
    try:
        chips.lookup(chip)
    except chips.ChipError as e:
        raise _bad(str(e)) from None
    return (name.strip() if sep else None), chip


parse_add.kind = "chip"  # type: ignore[attr-defined]

_NUM = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_LAT = re.compile(_NUM + r"\s*(ms|us|µs|s)")
_BW_UNITS = {"GB/s": 8.0, "MB/s": 8e-3,  # bytes (capital B)
             "Gb/s": 1.0, "Gbit/s": 1.0, "Gbps": 1.0, "gbit/s": 1.0, "gbps": 1.0,  # bits
             "Mb/s": 1e-3, "Mbit/s": 1e-3, "Mbps": 1e-3, "mbit/s": 1e-3, "mbps": 1e-3}
_BW = re.compile(_NUM + r"\s*(" + "|".join(re.escape(u) for u in _BW_UNITS) + ")")


def _link_value(v: str) -> LinkSpec:
    """A preset name or ``LATENCY,BANDWIDTH`` (0.3ms,5GB/s; 50us,40Gbit/s)."""
    key = v.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    parts = [p.strip() for p in v.split(",")]
    lat = _LAT.fullmatch(parts[0]) if len(parts) == 2 else None
    bw = _BW.fullmatch(parts[1]) if lat else None
    if not (lat and bw):
        raise _bad(f"{o.shown(v)} is not a preset ({', '.join(PRESETS)}) nor LATENCY,BANDWIDTH "
                   "such as 0.3ms,5GB/s (GB/s = gigabytes, Gbit/s = gigabits per second)")
    ms = float(lat.group(1)) * {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[lat.group(2)]
    gbps = float(bw.group(1)) * _BW_UNITS[bw.group(2)]
    if not (math.isfinite(ms) and ms <= 10_000 and math.isfinite(gbps) and 0 < gbps <= 1e5):
        raise _bad(f"{o.shown(v)}: latency must be 0..10 s and bandwidth more than 0 and at "
                   "most 100,000 Gbit/s")
    return LinkSpec(ms, gbps, v.strip())


def parse_link(text: str) -> tuple[str, str, LinkSpec]:
    """``A:B=PRESET`` or ``A:B=LATENCY,BANDWIDTH`` -> (a, b, LinkSpec)."""
    pair, sep, value = str(text).partition("=")
    ends = pair.split(":")
    if not sep or len(ends) != 2 or not all(e.strip() for e in ends) or \
            any(_BAD_NAME.search(e) for e in ends):
        raise _bad(f"{o.shown(text)} is not A:B=PRESET or A:B=LATENCY,BANDWIDTH, e.g. "
                   "studio:mini=tb5 or studio:mini=0.3ms,5GB/s")
    a, b = (e.strip() for e in ends)
    if a == b:
        raise _bad(f"{o.shown(text)}: a link joins two different nodes")
    return a, b, _link_value(value)


parse_link.kind = "link"  # type: ignore[attr-defined]


def build_parser() -> argparse.ArgumentParser:
    from graphsplit.cli import add_workload_arguments

    p = o.OneLineParser(prog="what-if", description=(
        "Which machine should I add, does a cable pay off: the best plan of the cluster "
        "beside the best plan with each hypothetical machine (--add) or link (--link), each "
        "alone and all together, with the gain. Added machines are estimated from their "
        "chip's roofline; link presets are tb5, tb4, 10gbe, 1gbe, wifi."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="link presets (one-way latency, bandwidth; measure yours with profile-link):\n"
        + "\n".join(f"  {k:<6} {v.latency_ms:g} ms, {v.bandwidth_gbps:g} Gbit/s: {v.source}"
                    for k, v in PRESETS.items()))
    p.add_argument("cluster", type=o.path("cluster file"), help="cluster file (JSON)")
    p.add_argument("--add", type=parse_add, action="append", default=[], metavar="[NAME=]CHIP",
                   help="a machine to add, e.g. 'M4 Pro 48GB' or mini2=m4-pro-48gb")
    p.add_argument("--link", type=parse_link, action="append", default=[],
                   metavar="A:B=PRESET", help="a cable between two nodes, both ways: a "
                   "preset (tb5, tb4, 10gbe, 1gbe, wifi) or 0.3ms,5GB/s")
    p.add_argument("--objective", default="latency", choices=list(OBJECTIVES))
    add_workload_arguments(p)
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return p


# -- variants -----------------------------------------------------------------------------------

@dataclass
class Change:
    kind: str  # "add" | "link"
    label: str  # what the table shows
    node: str | None = None  # add: the new node's id
    chip: str | None = None  # add: the chip text
    links: list[tuple[str, str, LinkSpec]] = dataclasses.field(default_factory=list)
    joint: bool = False  # a cable between two added machines: only in "all of the above"


@dataclass
class Variant:
    name: str
    changes: list[Change]


def _unique(base: str, taken: set[str]) -> str:
    nid, k = base, 2
    while nid in taken:
        nid, k = f"{base}-{k}", k + 1
    return nid


def plan_changes(cluster, adds: list[tuple[str | None, str]],
                 links: list[tuple[str, str, LinkSpec]]) -> list[Change]:
    """The changes in command-line order: one per --add (with the links that name it), one
    per --link between nodes of the cluster. Names are checked here (one UserError line)."""
    from graphsplit import chips

    taken = set(cluster.ids)
    out: list[Change] = []
    for name, chip in adds:
        spec = chips.lookup(chip)
        if name is not None and name in taken:
            raise UserError(f"--add {o.shown(name + '=' + chip)}: node {o.shown(name)} is "
                            "already in the cluster or added before; choose another name")
        nid = name if name is not None else _unique(spec.slug, taken)
        taken.add(nid)
        out.append(Change("add", f"+ {nid} ({spec.chip.family} {spec.memory_gb}GB*)", nid, chip))
    added = {c.node: c for c in out}
    for a, b, spec in links:
        for end in (a, b):
            if end not in taken:
                raise UserError(f"--link {o.shown(f'{a}:{b}={spec.label}')}: no node "
                                f"{o.shown(end)}; the nodes are {', '.join(sorted(taken))}")
        owner = added.get(a) or added.get(b)
        if a in added and b in added:  # both machines are new: only "all" holds the cable
            out.append(Change("link", f"link {a}:{b}={spec.label}", links=[(a, b, spec)],
                              joint=True))
        elif owner is not None:
            owner.links.append((a, b, spec))
            owner.label += f" {a}:{b}={spec.label}"
        else:
            out.append(Change("link", f"link {a}:{b}={spec.label}", links=[(a, b, spec)]))
    return out


def variants(changes: list[Change]) -> list[Variant]:
    """The baseline, every change alone, and all together when there are several."""
    out = [Variant("baseline", [])] + [Variant(c.label, [c]) for c in changes if not c.joint]
    if len(changes) > 1:
        out.append(Variant("all of the above", list(changes)))
    return out


def apply(cluster, changes: list[Change]):
    """A copy of `cluster` with the changes made (added nodes estimated from their chip)."""
    from graphsplit.cluster import Link, chip_node

    measured = sorted((n for n in cluster.nodes if not n.estimated), key=lambda n: n.id) or \
        sorted(cluster.nodes, key=lambda n: n.id)
    nodes, links = list(cluster.nodes), dict(cluster.links)
    for c in changes:
        if c.kind == "add":
            nodes.append(chip_node(c.node, c.chip, measured[0], where=f"--add {c.chip}"))
        for a, b, spec in c.links:
            lk = Link(spec.latency_ms / 1e3, spec.bandwidth_gbps * 1e9 / 8)
            links[(a, b)] = links[(b, a)] = lk
    return dataclasses.replace(cluster, nodes=nodes, links=links)


def evaluate(cluster, variant: Variant, objective: str, workload, runtime: str) -> dict:
    """The best plan of one variant (graphsplit.api.make_plan), or why there is none."""
    from graphsplit.api import make_plan
    from graphsplit.plan import stage_dict

    c = apply(cluster, variant.changes)
    entry: dict[str, Any] = {"name": variant.name, "nodes": c.ids,
                             "estimated": sorted(n.id for n in c.nodes if n.estimated),
                             "changes": [_change_dict(ch) for ch in variant.changes]}
    try:
        plan = make_plan(c, objective, workload, runtime)
    except UserError as e:
        return dict(entry, stages=[], predicted={}, error=str(e))
    p = plan.predicted
    keep = ("tpot_s", "ttft_s", "throughput_tps", "fits", "estimated", "stage_memory_bytes",
            "stage_capacity_bytes", "derived_from")
    return dict(entry, stages=[stage_dict(s) for s in plan.stages],
                predicted={k: p[k] for k in keep if k in p}, solver=plan.solver, error=None)


def _change_dict(c: Change) -> dict:
    d: dict[str, Any] = {"kind": c.kind}
    if c.kind == "add":
        d.update(node=c.node, chip=c.chip)
    d["links"] = [{"from": a, "to": b, "both_ways": True, "latency_ms": s.latency_ms,
                   "bandwidth_gbps": s.bandwidth_gbps, "preset": s.label if s.label in PRESETS
                   else None} for a, b, s in c.links]
    return d


def gain(base: dict, other: dict, objective: str) -> float | None:
    """How much better `other` is than `base` in the objective (>1 better); None if either
    has no plan."""
    bp, op = base.get("predicted"), other.get("predicted")
    if not bp or not op:
        return None
    if objective == "throughput":
        return op["throughput_tps"] / bp["throughput_tps"]
    key = "tpot_s" if objective == "latency" else "ttft_s"
    return bp[key] / op[key]


def compare(cluster, adds, links, objective: str, workload, runtime: str) -> dict:
    """Every variant's best plan and gain over the baseline (what `what-if --json` prints)."""
    vs = variants(plan_changes(cluster, adds, links))
    rows = [evaluate(cluster, v, objective, workload, runtime) for v in vs]
    for r in rows:
        r["gain"] = gain(rows[0], r, objective)
    return {"format": "mlx-split/what-if", "version": 1, "cluster_file": cluster.path,
            "model": cluster.model_info(), "objective": objective, "runtime": runtime,
            "workload": workload.to_dict(), "variants": rows,
            "derived_from": "measured cost tables; added machines from their chip's roofline "
                            "(estimated, graphsplit/roofline.py); link presets nominal",
            "link_presets": {k: dataclasses.asdict(v) for k, v in PRESETS.items()}}


# -- output -------------------------------------------------------------------------------------

def _stages(r: dict) -> str:
    est = set(r["estimated"])
    return " ".join(f"{s['node']}{'*' if s['node'] in est else ''}:{s['start_layer']}-"
                    f"{s['end_layer']}" for s in r["stages"])


def _memory(p: dict) -> str:
    used, cap = p.get("stage_memory_bytes", {}), p.get("stage_capacity_bytes", {})
    worst = max((used[n] / cap[n] for n in used if cap.get(n)), default=0.0)
    return f"{'yes' if p.get('fits') else 'NO'}, {worst:.0%}"


def _proven(solver: dict) -> str:
    """What the solver proved (SplitResult.proven where the solver says it)."""
    if solver.get("proven"):
        return str(solver["proven"])
    return "proven optimal" if solver.get("optimal") else "not proven"


def render(result: dict, console) -> None:
    from rich.table import Table

    w = result["workload"]
    t = Table(title=f"what-if: {result['model']['name']}, objective {result['objective']}, "
                    f"runtime {result['runtime']}, prompt {w['prompt_tokens']}, context "
                    f"{w['context_tokens']}, {w['streams']} stream(s)", title_justify="left")
    for col, just in (("variant", "left"), ("stages", "left"), ("tpot ms", "right"),
                      ("ttft ms", "right"), ("tok/s", "right"), ("fits, fullest", "right"),
                      ("gain", "right"), ("solver", "left")):
        t.add_column(col, justify=just)
    for r in result["variants"]:
        p = r["predicted"]
        if not p:
            t.add_row(r["name"], f"no plan: {r['error']}", "-", "-", "-", "-", "-", "-")
            continue
        g = "-" if r["gain"] is None else f"{r['gain']:.2f}x"
        t.add_row(r["name"], _stages(r), f"{p['tpot_s'] * 1e3:.2f}", f"{p['ttft_s'] * 1e3:.1f}",
                  f"{p['throughput_tps']:.2f}", _memory(p), g, _proven(r["solver"]))
    console.print(t)
    console.print("all times derived from the measured cost tables; * = machine estimated from "
                  "its chip's roofline (graphsplit/roofline.py), not measured; link presets "
                  "are nominal (what-if --help, docs/splitter.md); gain = better than the "
                  f"baseline in {result['objective']} (below 1.00x worse); fullest = the most "
                  "used share of a node's usable memory")
    for line in answers(result):
        console.print(line)


def answers(result: dict) -> list[str]:
    """One line per question: the best machine to add, whether each cable pays off."""
    rows = result["variants"][1:]
    adds = [r for r in rows if len(r["changes"]) == 1 and r["changes"][0]["kind"] == "add"]
    out = []
    scored = [r for r in adds if r["gain"] is not None]
    if scored:
        best = max(scored, key=lambda r: (r["gain"], r["name"]))
        out.append(f"best single addition: {best['name']} ({best['gain']:.2f}x "
                   f"{result['objective']})")
    elif adds and any(r["predicted"] for r in adds):
        fits = [r["name"] for r in adds if r["predicted"]]
        out.append(f"the baseline has no plan; it fits with: {', '.join(fits)}")
    for r in rows:
        if len(r["changes"]) == 1 and r["changes"][0]["kind"] == "link" and r["gain"]:
            verdict = "pays off" if r["gain"] >= 1.01 else "does not pay off (under 1%)"
            out.append(f"{r['name']}: {verdict} ({r['gain']:.3f}x {result['objective']})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.add and not args.link:
        raise UserError("what-if: give at least one --add CHIP or --link A:B=PRESET (see "
                        "what-if --help)")
    from graphsplit.cluster import load_cluster
    from graphsplit.costmodel import Workload

    workload = Workload(prompt_tokens=args.prompt_tokens, context_tokens=args.context_tokens,
                        streams=args.streams)
    cluster = load_cluster(args.cluster)
    result = compare(cluster, args.add, args.link, args.objective, workload, args.runtime)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 160))
    render(result, console)
    return 0


_main = main
main = guard(_main)

if __name__ == "__main__":
    sys.exit(main())
