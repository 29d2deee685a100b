"""The cluster: which machines (each with a measured or derived cost table), and the links between.

Cluster file (JSON)::

    {"model": "llama-3-8b",
     "nodes": [{"id": "studio", "profile": "data/profiles/studio--llama-3-8b.json"},
               {"id": "mini", "profile": "mini.json", "memory_bytes": 17179869184},
               {"id": "m3-ultra", "chip": "M3 Ultra 256GB"},
               {"id": "box", "chip": {"memory_bandwidth_gbs": 800, "fp16_tflops": 54,
                                      "memory_bytes": 206158430208}}],
     "links": [{"from": "studio", "to": "mini", "latency_ms": 0.2, "bandwidth_gbps": 40}],
     "default_link": {"latency_ms": 2.0, "bandwidth_gbps": 1.0}}

* ``profile``: a cost table written by ``profile-model`` (path relative to the cluster file).
  Optional overrides: ``memory_bytes`` (usable memory the splitter fits into),
  ``available_bytes`` (what exo-current's placement sees; default memory_bytes),
  ``total_bytes`` (what legacy exo's placement sees; default the table's device total).
* ``chip``: a machine that was not profiled: a known Apple chip by name ("M4 Pro 48GB",
  "m4-pro-48gb"; graphsplit.chips) or ``{memory_bandwidth_gbs, fp16_tflops, memory_bytes}``.
  Its table is the roofline of the chip itself (graphsplit.roofline): only the model's shape
  and bytes come from a measured table (``derive_from``'s, default the first measured node by
  id), never its times. Usable memory is Metal's default working set (chips.usable_bytes).
  Such nodes are ``estimated``.
* ``links``: DIRECTED pairs, latency in milliseconds, bandwidth in gigaBITS per second; add
  ``"both_ways": true`` to describe both directions at once. Missing pairs use ``default_link``
  (itself defaulting to 1 ms, 10 Gbit/s).
* ``collectives`` (optional, written by ``exo-bridge profile-link``): measured all-reduces over
  a group, ``{"nodes": [...], "op": "all_sum", "sizes_bytes": [...], "seconds": [...],
  "latency_s": ..., "bandwidth_Bps": ...}``; what a tensor-parallel stage pays (graphsplit.hybrid).
"""

from __future__ import annotations

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
CHIP = F.OneOf((F.Str(nonempty=True),
                F.Obj({"memory_bandwidth_gbs": F.Num(gt=0), "fp16_tflops": F.Num(gt=0),
                       "tflops": F.Num(gt=0), "memory_bytes": F.POS_BYTES},
                      name="an object {memory_bandwidth_gbs, fp16_tflops, memory_bytes}")),
               name='a chip name such as "M4 Pro 48GB" or an object {memory_bandwidth_gbs, '
                    'fp16_tflops, memory_bytes}')
# (a chip's missing fields are reported by cluster_from_dict, after its derive_from)
NODE = F.Obj({"id": _NAME, "profile": _NAME, "chip": CHIP, "derive_from": _NAME,
              "memory_bytes": F.POS_BYTES, "available_bytes": F.POS_BYTES,
              "total_bytes": F.POS_BYTES}, required=("id",),
             name='an object {"id", "profile"} or {"id", "chip"}')
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
    # on the ring backend exo-bridge's runner sums along a neighbour chain (`seconds`); what
    # MLX's own all_sum costs there (what exo runs) is kept beside it as `mlx_all_sum`
    mlx_all_sum: "Collective | None" = None

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
    estimated: bool = False  # table derived from a chip's roofline (graphsplit.roofline)
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
    # measured calibrations applied to the tables (graphsplit.calibration), one per table
    calibrations: list[dict[str, Any]] = field(default_factory=list)

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
                 memory_bytes: int | None = None, host: str = "derived",
                 chip_name: str | None = None, generation: int | None = None) -> CostTable:
    """The cost table of a chip that was not profiled (an ESTIMATE, not a measurement): the
    roofline of the chip's own bandwidth and TFLOPS at efficiencies measured on real Apple
    machines (graphsplit.roofline). Only the model's shape and bytes come from `base`.
    Memory: total = memory_bytes (default the base's), usable = Metal's default working set.
    `generation` (3 for an M3) picks the GEMV efficiency; None: the lower, M1 figure."""
    from graphsplit import chips, roofline

    if not (math.isfinite(memory_bandwidth_gbs) and memory_bandwidth_gbs > 0
            and math.isfinite(tflops) and tflops > 0):
        raise ClusterError("a chip needs memory_bandwidth_gbs > 0 and fp16_tflops > 0")
    total = int(memory_bytes if memory_bytes is not None else base.device.memory_total_bytes)
    name = chip_name or f"a chip of {memory_bandwidth_gbs:g} GB/s and {tflops:g} TFLOPS"
    return roofline.derive(base, memory_bandwidth_gbs, tflops, total, chips.usable_bytes(total),
                           host=host, chip_name=name, generation=generation)


def chip_node(node_id: str, chip: Any, base: Node, where: str = "chip") -> Node:
    """An estimated node: `chip` (a known chip's name or a dict {memory_bandwidth_gbs,
    fp16_tflops, memory_bytes}) with the model's shape and bytes from `base`'s table.
    Bad names or fields raise ClusterError (one line naming `where`)."""
    from graphsplit import chips

    if isinstance(chip, str):
        try:
            spec = chips.lookup(chip)
        except chips.ChipError as e:
            raise ClusterError(f"{where}: {e}; or give the chip as {{memory_bandwidth_gbs, "
                               "fp16_tflops, memory_bytes}") from None
        bw, tf, mem, name = spec.bandwidth_gbs, spec.fp16_tflops, spec.memory_bytes, spec.name
        gen = spec.chip.generation
    elif isinstance(chip, dict):
        try:
            bw = float(chip["memory_bandwidth_gbs"])
            tf = float(chip.get("fp16_tflops", chip.get("tflops")))
        except (KeyError, TypeError, ValueError):
            raise ClusterError(f"{where}: chip needs numbers memory_bandwidth_gbs and "
                               "fp16_tflops") from None
        mem = _int_field(chip, "memory_bytes", f"{where} chip")
        if mem is None:
            raise ClusterError(f"{where}: chip needs memory_bytes (total memory)")
        name, gen = None, None
    else:
        raise ClusterError(f"{where}: 'chip' must be a chip name such as \"M4 Pro 48GB\" or "
                           "an object {memory_bandwidth_gbs, fp16_tflops, memory_bytes}")
    table = derive_table(base.table, bw, tf, mem, host=node_id, chip_name=name, generation=gen)
    return Node(id=node_id, table=table, memory_bytes=int(table.device.memory_usable_bytes),
                estimated=True, profile=base.profile, derive_from=base.id)


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


def load_cluster(path: str | Path, calibration: bool = True) -> Cluster:
    """Read a cluster file; any problem raises ClusterError with one line saying what to fix.
    `calibration`: apply the measured calibration beside each table (graphsplit.calibration)."""
    p = Path(path)
    where = f"cluster file {p}"
    data = read_json(p, where, error=ClusterError)
    return cluster_from_dict(data, base_dir=p.parent, where=where, path=str(p),
                             calibration=calibration)


def cluster_from_dict(data: Any, base_dir: str | Path = ".", where: str = "cluster",
                      path: str | None = None, calibration: bool = False) -> Cluster:
    """Build a Cluster from the parsed JSON of a cluster file (see the module docstring)."""
    if not isinstance(data, dict):
        raise ClusterError(f"{where}: the top level must be a JSON object with 'nodes'")
    check_fields(data, where)
    specs = _node_specs(data.get("nodes"), where)
    tables, profiles = _read_profiles(specs, Path(base_dir), where)
    calibrations = []
    if calibration:  # the hook: a measured calibration beside a table scales its rows
        from graphsplit.calibration import calibrated
        for nid in tables:
            tables[nid], doc = calibrated(tables[nid], profiles[nid])
            calibrations += [doc] if doc else []
    measured = {nid: _node(nid, nd, tables, profiles, f"{where}: node {nid!r}")
                for nid, nd in specs.items() if "profile" in nd}
    nodes = [measured[nid] if nid in measured else
             _estimated_node(nid, nd, measured, f"{where}: node {nid!r}")
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
                   collectives=_collectives(data.get("collectives", []), specs, where),
                   calibrations=calibrations)


def _node_specs(raw_nodes: Any, where: str) -> dict[str, dict]:
    """The file's node entries by id (ids unique, exactly one of 'profile' or 'chip')."""
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ClusterError(f"{where}: 'nodes' must be a non-empty list of "
                           "{\"id\", \"profile\"} or {\"id\", \"chip\"}")
    specs: dict[str, dict] = {}
    for i, nd in enumerate(raw_nodes):
        if not isinstance(nd, dict) or not isinstance(nd.get("id"), str) or not nd["id"]:
            raise ClusterError(f"{where}: node {i} needs a string 'id'")
        if nd["id"] in specs:
            raise ClusterError(f"{where}: node id {nd['id']!r} appears twice")
        if ("profile" in nd) == ("chip" in nd):
            raise ClusterError(f"{where}: node {nd['id']!r} needs exactly one of 'profile' (a "
                               "cost table) or 'chip' (e.g. \"M4 Pro 48GB\")")
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


def _shape_source(nid: str, nd: dict, measured: dict[str, Node], nw: str) -> Node:
    """The measured node whose table gives a chip node its model shape and bytes:
    'derive_from' when given, else the first measured node by id (the shape and bytes are the
    same in every table of the model, so the choice does not change the estimate)."""
    derive = nd.get("derive_from")
    if derive is None and not measured:
        raise ClusterError(f"{nw}: a chip node needs a node with a measured profile of the "
                           "model in the same file (its shape and bytes come from that table)")
    if derive is None:
        return measured[min(measured)]
    if derive not in measured:
        raise ClusterError(f"{nw}: 'derive_from' must name a node with a measured "
                           f"profile (one of {', '.join(sorted(measured)) or 'none'})")
    return measured[derive]


def _node(nid: str, nd: dict, tables: dict[str, CostTable], profiles: dict[str, str],
          nw: str) -> Node:
    """One measured node: its own table, with the file's memory overrides."""
    table = tables[nid]
    memory = _int_field(nd, "memory_bytes", nw)
    return Node(id=nid, table=table,
                memory_bytes=memory if memory is not None else
                int(table.device.memory_usable_bytes),
                available_bytes=_int_field(nd, "available_bytes", nw),
                total_bytes=_int_field(nd, "total_bytes", nw), profile=profiles[nid])


def _estimated_node(nid: str, nd: dict, measured: dict[str, Node], nw: str) -> Node:
    """A 'chip' node (chip_node), with the file's memory overrides."""
    n = chip_node(nid, nd["chip"], _shape_source(nid, nd, measured, nw), nw)
    memory = _int_field(nd, "memory_bytes", nw)
    n.memory_bytes = memory if memory is not None else n.memory_bytes
    n.available_bytes = _int_field(nd, "available_bytes", nw) or int(n.memory_bytes)
    n.total_bytes = _int_field(nd, "total_bytes", nw) or n.total_bytes
    return n


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
        mlx = c.get("mlx_all_sum")
        other = None
        if isinstance(mlx, dict) and len(mlx.get("seconds") or []) == len(xs):
            try:
                other = Collective(group, c["op"], tuple(float(x) for x in xs),
                                   tuple(float(y) for y in mlx["seconds"]),
                                   float(mlx["latency_s"]), float(mlx["bandwidth_Bps"]),
                                   c.get("backend", ""), c.get("measured", ""))
            except (KeyError, TypeError, ValueError):
                raise ClusterError(f"{cw}.mlx_all_sum: needs seconds (one per size), latency_s "
                                   "and bandwidth_Bps; re-measure with exo-bridge "
                                   "profile-link") from None
        col = Collective(group, c["op"], tuple(float(x) for x in xs),
                         tuple(float(y) for y in ys), float(c["latency_s"]),
                         float(c["bandwidth_Bps"]), c.get("backend", ""), c.get("measured", ""),
                         other)
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
