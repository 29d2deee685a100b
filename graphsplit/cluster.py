"""The cluster: which machines (each with a measured or derived cost table), and the links between.

Cluster file (JSON)::

    {"model": "llama-3-8b",
     "nodes": [{"id": "studio", "profile": "data/profiles/studio--llama-3-8b.json"},
               {"id": "mini", "profile": "mini.json", "memory_bytes": 17179869184},
               {"id": "m3-ultra", "derive_from": "studio",
                "chip": {"memory_bandwidth_gbs": 800, "fp16_tflops": 54,
                         "memory_bytes": 206158430208}}],
     "links": [{"from": "studio", "to": "mini", "latency_ms": 0.2, "bandwidth_gbps": 40}],
     "default_link": {"latency_ms": 2.0, "bandwidth_gbps": 1.0}}

* ``profile``: a cost table written by ``profile-model`` (path relative to the cluster file).
  Optional overrides: ``memory_bytes`` (usable memory the splitter fits into),
  ``available_bytes`` (what exo-current's placement sees; default memory_bytes),
  ``total_bytes`` (what legacy exo's placement sees; default the table's device total).
* ``chip`` + ``derive_from``: a machine that was not profiled. Its table is the measured table of
  ``derive_from`` scaled by the roofline: decode times by the memory-bandwidth ratio, prefill
  times by the compute (TFLOPS) ratio. ``chip.memory_bytes`` is its total memory; usable memory is
  scaled by the measured node's usable/total ratio. Such nodes are ``estimated``.
* ``links``: DIRECTED pairs, latency in milliseconds, bandwidth in gigaBITS per second; add
  ``"both_ways": true`` to describe both directions at once. Missing pairs use ``default_link``
  (itself defaulting to 1 ms, 10 Gbit/s).
* ``collectives`` (optional, written by ``exo-bridge profile-link``): measured all-reduces over
  a group, ``{"nodes": [...], "op": "all_sum", "sizes_bytes": [...], "seconds": [...],
  "latency_s": ..., "bandwidth_Bps": ...}``; what a tensor-parallel stage pays (graphsplit.hybrid).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profiler import fields as F
from profiler.costtable import CostTable, read_table
from profiler.errors import UserError
from profiler.files import read_json

DEFAULT_LINK = {"latency_ms": 1.0, "bandwidth_gbps": 10.0}


class ClusterError(UserError):
    """A cluster file that cannot be used; the message names the file and what is wrong."""


_NAME = F.Str(nonempty=True)
LINK_FIELDS = {"latency_ms": F.Num(ge=0), "bandwidth_gbps": F.Num(gt=0)}
MEASURED = F.Obj({"by": F.Str(), "repeats": F.Int(ge=0), "at": F.Str(),
                  # derived per-size numbers (one_way_ms may be < 0 on a noisy link)
                  "sizes": F.Map(F.Obj(extra=F.Num(), name="an object of numbers"))},
                 name="an object (how profile-link measured the link)")
LINK = F.Obj({"from": _NAME, "to": _NAME, **LINK_FIELDS, "both_ways": F.Bool(),
              "measured": MEASURED}, required=("from", "to"),
             name="an object {from, to, latency_ms, bandwidth_gbps}")
CHIP = F.Obj({"memory_bandwidth_gbs": F.Num(gt=0), "fp16_tflops": F.Num(gt=0),
              "tflops": F.Num(gt=0), "memory_bytes": F.POS_BYTES},
             name="an object {memory_bandwidth_gbs, fp16_tflops, memory_bytes}")
# (a chip's missing fields are reported by cluster_from_dict, after its derive_from)
NODE = F.Obj({"id": _NAME, "profile": _NAME, "chip": CHIP, "derive_from": _NAME,
              "memory_bytes": F.POS_BYTES, "available_bytes": F.POS_BYTES,
              "total_bytes": F.POS_BYTES}, required=("id",),
             name='an object {"id", "profile"} or {"id", "chip", "derive_from"}')
# measured all-reduces over a group of nodes (exo-bridge profile-link; INTERFACES I3)
COLLECTIVE = F.Obj({"nodes": F.List(_NAME, nonempty=True), "op": F.Str(nonempty=True),
                    "backend": F.Str(), "sizes_bytes": F.List(F.Num(gt=0), nonempty=True),
                    "seconds": F.List(F.SECONDS, nonempty=True), "spread": F.List(F.Num(ge=0)),
                    "latency_s": F.SECONDS, "bandwidth_Bps": F.Num(gt=0), "measured": F.Str()},
                   required=("nodes", "op", "sizes_bytes", "seconds", "latency_s",
                             "bandwidth_Bps"),
                   name="an object {nodes, op, sizes_bytes, seconds, latency_s, bandwidth_Bps}")
CLUSTER = F.Obj({"model": _NAME, "nodes": F.List(NODE, nonempty=True), "links": F.List(LINK),
                 "collectives": F.List(COLLECTIVE),
                 "default_link": F.Obj(LINK_FIELDS, name="an object {latency_ms, "
                                                          "bandwidth_gbps}")},
                required=("nodes",), name="an object with 'nodes'")


def check_fields(data: Any, where: str) -> None:
    """Every field of a parsed cluster file has the right type and range (one ClusterError
    line naming the field otherwise). `where` names the file."""
    try:
        F.check(data, CLUSTER)
    except F.FieldError as e:
        raise ClusterError(f"{where}: {e.path}: {e.problem}; fix that field (the format is in "
                           "README.md, 'A cluster file')") from None


@dataclass(frozen=True)
class Link:
    latency_s: float
    bandwidth_Bps: float  # bytes per second

    def time(self, nbytes: float) -> float:
        """alpha + bytes / beta (seconds)."""
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class Collective:
    """One measured collective over a group of nodes (I3): median seconds at `sizes_bytes`."""
    nodes: tuple[str, ...]  # sorted
    op: str
    sizes_bytes: tuple[float, ...]
    seconds: tuple[float, ...]
    latency_s: float
    bandwidth_Bps: float
    backend: str = ""
    measured: str = ""

    def time(self, nbytes: float) -> float:
        """Seconds for one collective of `nbytes`: piecewise-linear between the measured sizes;
        below the smallest the smallest's time (latency bound); beyond the largest its time
        plus the extra bytes at the measured bandwidth (derived from measurements)."""
        xs, ys = self.sizes_bytes, self.seconds
        if nbytes <= xs[0]:
            return ys[0]
        if nbytes >= xs[-1]:
            return ys[-1] + (nbytes - xs[-1]) / self.bandwidth_Bps
        i = max(k for k in range(len(xs) - 1) if xs[k] <= nbytes)
        return ys[i] + (ys[i + 1] - ys[i]) * (nbytes - xs[i]) / (xs[i + 1] - xs[i])


@dataclass
class Node:
    id: str
    table: CostTable
    memory_bytes: int  # usable memory the splitter fits stages into
    available_bytes: int | None = None  # exo-current placement input (psutil available)
    total_bytes: int | None = None  # legacy exo placement input (total memory)
    estimated: bool = False  # table derived from another node's by roofline scaling
    profile: str | None = None  # path of the measured table (of derive_from when estimated)
    derive_from: str | None = None

    def __post_init__(self):
        if self.available_bytes is None:
            self.available_bytes = int(self.memory_bytes)
        if self.total_bytes is None:
            self.total_bytes = int(self.table.device.memory_total_bytes)


@dataclass
class Cluster:
    model: str
    nodes: list[Node]
    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    default_link: Link = field(default_factory=lambda: _link_from(DEFAULT_LINK, "default"))
    path: str | None = None
    # per-runtime measurements, e.g. {"exo-legacy": {"message_overhead_ms": 0.3, "source": ...}}
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # measured collectives by (sorted group, op), e.g. {(("a", "b"), "all_sum"): Collective}
    collectives: dict[tuple[tuple[str, ...], str], Collective] = field(default_factory=dict)

    def collective(self, group, op: str = "all_sum") -> Collective | None:
        """The measured `op` over exactly the nodes of `group` (any order), or None."""
        return self.collectives.get((tuple(sorted(group)), op))

    @property
    def n_layers(self) -> int:
        return self.nodes[0].table.n_layers

    @property
    def ids(self) -> list[str]:
        return [n.id for n in self.nodes]

    @property
    def config_hash(self) -> str:
        return self.nodes[0].table.model.config_hash

    @property
    def hidden_size(self) -> int:
        return self.nodes[0].table.model.hidden_size

    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def link(self, a: str, b: str) -> Link:
        """The directed link a -> b (the default link when none was described)."""
        return self.links.get((a, b), self.default_link)

    def model_info(self) -> dict[str, Any]:
        m = self.nodes[0].table.model
        return {"name": self.model, "n_layers": m.n_layers, "config_hash": m.config_hash}


def _link_from(d: Any, where: str) -> Link:
    if not isinstance(d, dict):
        raise ClusterError(f"{where}: a link must be an object with latency_ms and bandwidth_gbps")
    try:
        lat = float(d.get("latency_ms", DEFAULT_LINK["latency_ms"]))
        bw = float(d.get("bandwidth_gbps", DEFAULT_LINK["bandwidth_gbps"]))
    except (TypeError, ValueError):
        raise ClusterError(f"{where}: latency_ms and bandwidth_gbps must be numbers") from None
    if not (math.isfinite(lat) and lat >= 0):
        raise ClusterError(f"{where}: latency_ms is {lat}; it must be a finite number >= 0")
    if not (math.isfinite(bw) and bw > 0):
        raise ClusterError(f"{where}: bandwidth_gbps is {bw}; it must be a finite number > 0")
    return Link(lat / 1000.0, bw * 1e9 / 8.0)


def derive_table(base: CostTable, memory_bandwidth_gbs: float, tflops: float,
                 memory_bytes: int | None = None, host: str = "derived") -> CostTable:
    """Roofline-scale a measured table to another chip (an ESTIMATE, not a measurement).

    Decode is memory-bandwidth bound: decode_s *= base_bandwidth / new_bandwidth.
    Prefill is compute bound: prefill_s *= base_tflops / new_tflops.
    Memory: total = memory_bytes, usable scaled by the base's usable/total ratio.
    """
    bd = base.device
    if bd.memory_bandwidth_gbs <= 0 or bd.matmul_tflops <= 0:
        raise ClusterError(f"cannot derive from host {bd.host}: its table reports zero memory "
                           "bandwidth or TFLOPS; re-profile it or profile the new chip directly")
    if memory_bandwidth_gbs <= 0 or tflops <= 0:
        raise ClusterError("a chip needs memory_bandwidth_gbs > 0 and fp16_tflops > 0")
    t = copy.deepcopy(base)
    kd = bd.memory_bandwidth_gbs / memory_bandwidth_gbs
    kp = bd.matmul_tflops / tflops
    for r in t.rows:
        r.decode_s = [x * kd for x in r.decode_s]
        r.prefill_s = [x * kp for x in r.prefill_s]
    d = t.device
    if memory_bytes is not None:
        ratio = (bd.memory_usable_bytes / bd.memory_total_bytes) if bd.memory_total_bytes else 0.8
        d.memory_total_bytes = int(memory_bytes)
        d.memory_usable_bytes = int(memory_bytes * ratio)
    d.memory_bandwidth_gbs = float(memory_bandwidth_gbs)
    d.matmul_tflops = float(tflops)
    d.host = host
    d.name = f"{host} (derived from {bd.host} by roofline scaling)"
    t.method = dict(t.method, derived_from=bd.host, decode_scale=kd, prefill_scale=kp)
    return t


def _int_field(d: dict, key: str, where: str) -> int | None:
    if key not in d:
        return None
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ClusterError(f"{where}: {key} is {v!r}; it must be a positive number of bytes")
    return int(v)


def _check_same_model(nodes: list[Node], where: str) -> None:
    ref = nodes[0]
    for n in nodes[1:]:
        a, b = ref.table.model, n.table.model
        if a.config_hash != b.config_hash or a.n_layers != b.n_layers:
            raise ClusterError(f"{where}: node {n.id!r} was profiled on model {b.name} "
                               f"({b.config_hash[:19]}, {b.n_layers} layers; {n.profile}) but "
                               f"node {ref.id!r} on {a.name} ({a.config_hash[:19]}, "
                               f"{a.n_layers} layers; {ref.profile}): model.config_hash differs; "
                               "profile every node with the same model")


def load_cluster(path: str | Path) -> Cluster:
    """Read a cluster file; any problem raises ClusterError with one line saying what to fix."""
    p = Path(path)
    where = f"cluster file {p}"
    data = read_json(p, where, error=ClusterError)
    return cluster_from_dict(data, base_dir=p.parent, where=where, path=str(p))


def cluster_from_dict(data: Any, base_dir: str | Path = ".", where: str = "cluster",
                      path: str | None = None) -> Cluster:
    """Build a Cluster from the parsed JSON of a cluster file (see the module docstring)."""
    if not isinstance(data, dict):
        raise ClusterError(f"{where}: the top level must be a JSON object with 'nodes'")
    check_fields(data, where)
    specs = _node_specs(data.get("nodes"), where)
    tables, profiles = _read_profiles(specs, Path(base_dir), where)
    nodes = [_node(nid, nd, tables, profiles, f"{where}: node {nid!r}")
             for nid, nd in specs.items()]
    _check_same_model(nodes, where)
    model = data.get("model", nodes[0].table.model.name)
    m = nodes[0].table.model
    if not isinstance(model, str) or model not in (m.name, m.repo_id):
        raise ClusterError(f"{where}: model {model!r} does not match the model.name "
                           f"{m.name!r} of the cost tables ({nodes[0].profile}); fix 'model' "
                           "or use tables of that model")
    default = _link_from(data.get("default_link", DEFAULT_LINK), f"{where}: default_link")
    return Cluster(model=model, nodes=nodes, links=_links(data.get("links", []), specs, where),
                   default_link=default, path=path,
                   runtimes=_runtimes(data.get("runtimes", {}), f"{where}: runtimes"),
                   collectives=_collectives(data.get("collectives", []), specs, where))


def _node_specs(raw_nodes: Any, where: str) -> dict[str, dict]:
    """The file's node entries by id (ids unique, exactly one of 'profile' or 'chip')."""
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ClusterError(f"{where}: 'nodes' must be a non-empty list of "
                           "{\"id\", \"profile\"} or {\"id\", \"chip\", \"derive_from\"}")
    specs: dict[str, dict] = {}
    for i, nd in enumerate(raw_nodes):
        if not isinstance(nd, dict) or not isinstance(nd.get("id"), str) or not nd["id"]:
            raise ClusterError(f"{where}: node {i} needs a string 'id'")
        if nd["id"] in specs:
            raise ClusterError(f"{where}: node id {nd['id']!r} appears twice")
        if ("profile" in nd) == ("chip" in nd):
            raise ClusterError(f"{where}: node {nd['id']!r} needs exactly one of 'profile' (a "
                               "cost table) or 'chip' (with 'derive_from')")
        specs[nd["id"]] = nd
    return specs


def _read_profiles(specs: dict[str, dict], base_dir: Path,
                   where: str) -> tuple[dict[str, CostTable], dict[str, str]]:
    """The measured nodes' cost tables (paths relative to the cluster file) and their paths."""
    tables: dict[str, CostTable] = {}
    profiles: dict[str, str] = {}
    for nid, nd in specs.items():
        if "profile" not in nd:
            continue
        if not isinstance(nd["profile"], str):
            raise ClusterError(f"{where}: node {nid!r}: 'profile' must be a path")
        tp = Path(nd["profile"])
        if not tp.is_absolute():
            tp = base_dir / tp
        if not tp.exists():
            raise ClusterError(f"{where}: node {nid!r}: profile {tp} does not exist; run "
                               "`profile-model` on that machine and copy the table here")
        tables[nid] = read_table(tp)
        profiles[nid] = str(tp)
    return tables, profiles


def _derived_table(nid: str, nd: dict, tables: dict[str, CostTable],
                   profiles: dict[str, str], nw: str) -> CostTable:
    """A 'chip' node's table: its 'derive_from' node's measured table scaled by roofline."""
    chip = nd["chip"]
    derive = nd.get("derive_from")
    if not isinstance(chip, dict):
        raise ClusterError(f"{nw}: 'chip' must be an object with memory_bandwidth_gbs, "
                           "fp16_tflops and memory_bytes")
    if derive not in tables:
        raise ClusterError(f"{nw}: 'derive_from' must name a node with a measured "
                           f"profile (one of {', '.join(sorted(tables)) or 'none'})")
    try:
        bw = float(chip["memory_bandwidth_gbs"])
        tf = float(chip.get("fp16_tflops", chip.get("tflops")))
    except (KeyError, TypeError, ValueError):
        raise ClusterError(f"{nw}: chip needs numbers memory_bandwidth_gbs and "
                           "fp16_tflops") from None
    mem = _int_field(chip, "memory_bytes", f"{nw} chip")
    if mem is None:
        raise ClusterError(f"{nw}: chip needs memory_bytes (total memory)")
    bd = tables[derive].device
    for key in ("memory_bandwidth_gbs", "matmul_tflops"):
        if getattr(bd, key) <= 0:
            raise ClusterError(
                f"{nw}: derive_from {derive!r}: cost table {profiles[derive]}: "
                f"device.{key} is {getattr(bd, key)}, so nothing can be scaled from it; "
                f"profile {derive} with its microbenchmarks (without --no-microbench)")
    return derive_table(tables[derive], bw, tf, mem, host=nid)


def _node(nid: str, nd: dict, tables: dict[str, CostTable], profiles: dict[str, str],
          nw: str) -> Node:
    """One node: measured (its own table) or estimated (a chip derived from a measured one)."""
    if "chip" in nd:
        table = _derived_table(nid, nd, tables, profiles, nw)
        derive, estimated, profile = nd.get("derive_from"), True, profiles[nd["derive_from"]]
    else:
        table, derive, estimated, profile = tables[nid], None, False, profiles[nid]
    memory = _int_field(nd, "memory_bytes", nw)
    return Node(id=nid, table=table,
                memory_bytes=memory if memory is not None else
                int(table.device.memory_usable_bytes),
                available_bytes=_int_field(nd, "available_bytes", nw),
                total_bytes=_int_field(nd, "total_bytes", nw),
                estimated=estimated, profile=profile, derive_from=derive)


def _links(raw_links: Any, specs: dict[str, dict], where: str) -> dict[tuple[str, str], Link]:
    """Directed links by (from, to); `both_ways` adds the reverse unless the file gives it."""
    if not isinstance(raw_links, list):
        raise ClusterError(f"{where}: 'links' must be a list of {{from, to, latency_ms, "
                           "bandwidth_gbps}}")
    links: dict[tuple[str, str], Link] = {}
    for i, ln in enumerate(raw_links):
        lw = f"{where}: link {i}"
        if not isinstance(ln, dict) or ln.get("from") not in specs or ln.get("to") not in specs:
            raise ClusterError(f"{lw}: 'from' and 'to' must name nodes of this file")
        if ln["from"] == ln["to"]:
            raise ClusterError(f"{lw}: a link joins two different nodes")
        lk = _link_from(ln, lw)
        links[(ln["from"], ln["to"])] = lk
        if ln.get("both_ways"):
            links.setdefault((ln["to"], ln["from"]), lk)
    return links


def _collectives(raw: list, specs: dict[str, dict],
                 where: str) -> dict[tuple[tuple[str, ...], str], Collective]:
    """The optional `collectives` section (fields checked by COLLECTIVE): a group of >= 2
    distinct nodes of this file, sizes increasing with one time each. Several entries for one
    group and op: the one measured last (`measured`, ISO time) is used."""
    out: dict[tuple[tuple[str, ...], str], Collective] = {}
    for i, c in enumerate(raw):
        cw = f"{where}: collectives[{i}]"
        group = tuple(sorted(c["nodes"]))
        if len(set(group)) != len(group) or len(group) < 2:
            raise ClusterError(f"{cw}.nodes: {c['nodes']} must name two or more different "
                               "nodes; re-measure with exo-bridge profile-link")
        unknown = [n for n in group if n not in specs]
        if unknown:
            raise ClusterError(f"{cw}.nodes: {', '.join(unknown)} is not a node of this file")
        xs, ys = c["sizes_bytes"], c["seconds"]
        if len(xs) != len(ys) or any(b <= a for a, b in zip(xs, xs[1:])):
            raise ClusterError(f"{cw}: sizes_bytes must increase and have one entry in "
                               "seconds each; re-measure with exo-bridge profile-link")
        col = Collective(group, c["op"], tuple(float(x) for x in xs),
                         tuple(float(y) for y in ys), float(c["latency_s"]),
                         float(c["bandwidth_Bps"]), c.get("backend", ""), c.get("measured", ""))
        key = (group, col.op)
        if key not in out or col.measured >= out[key].measured:
            out[key] = col
    return out


def _runtimes(d: Any, where: str) -> dict[str, dict[str, Any]]:
    """The optional `runtimes` section: {RUNTIME: {"message_overhead_ms": x >= 0, ...}}."""
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        raise ClusterError(f"{where}: must be an object {{runtime: {{\"message_overhead_ms\": "
                           "number}}}}")
    for rt, sec in d.items():
        v = sec.get("message_overhead_ms", 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise ClusterError(f"{where}: {rt}.message_overhead_ms is {v!r}; it must be a "
                               "number >= 0 (milliseconds per message)")
    return {k: dict(v) for k, v in d.items()}


def cluster_from_tables(tables: dict[str, CostTable], links: dict | None = None,
                        default_link: Link | dict | None = None,
                        memory: dict[str, int] | None = None) -> Cluster:
    """Programmatic cluster (for re-planning from a live topology).

    `links` maps (from, to) to a Link or to {"latency_ms", "bandwidth_gbps"}; `memory` maps a node
    id to its usable bytes (default: the table's memory_usable_bytes). Node order = dict order.
    """
    if not tables:
        raise ClusterError("cluster: no nodes")
    nodes = []
    for nid, t in tables.items():
        mem = (memory or {}).get(nid, int(t.device.memory_usable_bytes))
        nodes.append(Node(id=str(nid), table=t, memory_bytes=int(mem)))
    _check_same_model(nodes, "cluster")
    if default_link is None:
        dl = _link_from(DEFAULT_LINK, "default")
    elif isinstance(default_link, Link):
        dl = default_link
    else:
        dl = _link_from(default_link, "default_link")
    lk = {}
    for key, v in (links or {}).items():
        lk[tuple(key)] = v if isinstance(v, Link) else _link_from(v, f"link {key}")
    return Cluster(model=nodes[0].table.model.name, nodes=nodes, links=lk, default_link=dl)
