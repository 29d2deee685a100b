"""Current exo's JSON: the ONLY module of the bridge that knows its shapes.

Current exo (the 2025+ rewrite, snapshot b5375f8) serialises its pydantic models tag-wrapped
with camelCase keys in API answers, snake_case inside its event stream (model_dump_json), and
accepts either on input::

    {"MlxRingInstance": {
        "instanceId": "...",
        "shardAssignments": {
            "modelId": "mlx-community/...",
            "runnerToShard": {RUNNER: {"PipelineShardMetadata": {
                "modelCard": {"modelId": ..., "storageSize": {"inBytes": N}, "nLayers": 32,
                              "hiddenSize": ..., "supportsTensor": ..., "tasks": [...],
                              "backends": [...], ...},
                "deviceRank": 0, "worldSize": 2, "startLayer": 0, "endLayer": 16,
                "nLayers": 32}}},
            "nodeToRunner": {NODE: RUNNER}},
        "hostsByNode": {NODE: [{"ip": ..., "port": ...}, ...one per rank...]},
        "ephemeralPort": 52416}}

`MlxJacclInstance` carries `jacclDevices` (a rank x rank matrix of RDMA interface names) and
`jacclCoordinators` (node -> "ip:port" of rank 0) instead of hosts. Layer ranges are half-open.
A newer `ShardAssignments` (open upstream work) lists `shards: [[node, runner, shard], ...]` in
rank order with `primaryOutputNode`; both forms are read and written back in the form they came
in. Older exo's `MlxRingInstance.hosts` (one host per rank) is re-indexed too.

Also here: `/instance/previews` entries (snake_case; Tensor previews, for a pipeline plan, and
`instance: null` entries are skipped, not fatal; a Tensor plan reads TensorShardMetadata ranks,
every rank all layers [0, n_layers), equal shares), `/instance/await`'s server-sent events
(`{"type": "ready", ...}` or `{"type": "timeout", ...}`), error bodies (`{"error": {"message": ...}}` from exo's handlers,
`{"detail": [...]}` from its request validation), `/state` (node names, memory, topology
connections with their addresses, RDMA interfaces), and building an instance from scratch
when no preview covers the planned nodes. Any shape it does not know where it needs one raises
`ExoSchemaError` with one line naming what was unexpected; the schema is still moving upstream,
so this is where a new shape gets taught.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, urlencode

from profiler.errors import UserError

KNOWN_INSTANCES = ("MlxRingInstance", "MlxJacclInstance")
KNOWN_SHARDS = ("PipelineShardMetadata",)
PIPELINE_SHARD, TENSOR_SHARD = "PipelineShardMetadata", "TensorShardMetadata"
TENSOR_SHARDS = (TENSOR_SHARD,)  # what a Tensor instance's ranks are (exo's shards.py)
PLACEHOLDER_IP = "198.51.100.1"  # exo's address for ring ranks that are not neighbours
SELF_IP = "0.0.0.0"


class ExoSchemaError(UserError):
    """exo answered with a JSON shape this bridge does not know."""


# ---------------------------------------------------------------- key helpers


def snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def key_of(d: dict, camel: str) -> str | None:
    """The key `camel` or its snake_case form, whichever `d` uses (None if neither)."""
    if camel in d:
        return camel
    s = snake(camel)
    return s if s in d else None


def get(d: Any, camel: str, where: str, required: bool = True, default: Any = None) -> Any:
    if not isinstance(d, dict):
        raise ExoSchemaError(f"unexpected exo JSON at {where}: expected an object, got "
                             f"{type(d).__name__}")
    k = key_of(d, camel)
    if k is None:
        if required:
            raise ExoSchemaError(f"unexpected exo JSON at {where}: no '{camel}' (keys: "
                                 f"{', '.join(sorted(d)) or 'none'}); this exo version's schema "
                                 "is not supported by exo-bridge")
        return default
    return d[k]


def put(d: dict, camel: str, value: Any) -> None:
    """Set `camel` in the style `d` already uses (camelCase if it has neither)."""
    d[key_of(d, camel) or camel] = value


def untag(obj: Any, known: tuple[str, ...], what: str) -> tuple[str, dict]:
    """`{"Tag": {...}}` -> ("Tag", {...}); an unknown tag or shape raises ExoSchemaError."""
    if not isinstance(obj, dict) or len(obj) != 1:
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ExoSchemaError(f"unexpected exo JSON for {what}: expected one tag such as "
                             f"{{\"{known[0]}\": {{...}}}}, got {keys}")
    (tag, body), = obj.items()
    if tag not in known:
        raise ExoSchemaError(f"unexpected exo {what} type {tag!r}: exo-bridge knows "
                             f"{', '.join(known)}")
    if not isinstance(body, dict):
        raise ExoSchemaError(f"unexpected exo JSON for {what} {tag}: body is not an object")
    return tag, body


def memory_bytes(v: Any, where: str) -> int:
    """exo's `Memory` ({"inBytes": N}) or a plain number of bytes."""
    if isinstance(v, bool):
        raise ExoSchemaError(f"unexpected exo JSON at {where}: memory is a boolean")
    if isinstance(v, (int, float)):
        return int(v)
    n = get(v, "inBytes", where)
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise ExoSchemaError(f"unexpected exo JSON at {where}.inBytes: {n!r} is not a number "
                             "of bytes")
    return int(n)


# ---------------------------------------------------------------- views


@dataclass
class ShardView:
    runner_id: str
    node_id: str
    tag: str
    device_rank: int
    world_size: int
    start_layer: int
    end_layer: int
    n_layers: int
    body: dict  # the shard's raw fields (modelCard and anything else), untouched


@dataclass
class InstanceView:
    tag: str
    body: dict  # the instance's raw fields
    instance_id: str
    model_id: str
    shards: list[ShardView]  # sorted by device rank

    @property
    def node_ids(self) -> list[str]:
        return [s.node_id for s in self.shards]

    @property
    def n_layers(self) -> int:
        return self.shards[0].n_layers

    @property
    def model_card(self) -> dict:
        return get(self.shards[0].body, "modelCard", "shard", required=False, default={}) or {}

    def storage_bytes(self) -> int | None:
        card = self.model_card
        v = get(card, "storageSize", "modelCard", required=False)
        return None if v is None else memory_bytes(v, "modelCard.storageSize")


def parse_instance(data: Any, shards: tuple[str, ...] = KNOWN_SHARDS) -> InstanceView:
    """A tag-wrapped instance (optionally inside `{"instance": ...}`) -> InstanceView; its
    shards must be of a kind in `shards` (Pipeline by default, Tensor for a Tensor plan)."""
    if isinstance(data, dict) and len(data) == 1 and "instance" in data:
        data = data["instance"]
    tag, body = untag(data, KNOWN_INSTANCES, "instance")
    where = tag
    instance_id = str(get(body, "instanceId", where))
    sa = get(body, "shardAssignments", where)
    model_id = str(get(sa, "modelId", f"{where}.shardAssignments"))
    if key_of(sa, "runnerToShard") is None and "shards" in sa:
        entries = _list_form(sa["shards"], f"{where}.shardAssignments.shards")
    else:
        r2s = get(sa, "runnerToShard", f"{where}.shardAssignments")
        n2r = get(sa, "nodeToRunner", f"{where}.shardAssignments")
        if not isinstance(r2s, dict) or not isinstance(n2r, dict):
            raise ExoSchemaError(f"unexpected exo JSON at {where}.shardAssignments: runnerToShard "
                                 "and nodeToRunner must be objects")
        r2n = {str(runner): str(node) for node, runner in n2r.items()}
        entries = []
        for runner, shard in r2s.items():
            if str(runner) not in r2n:
                raise ExoSchemaError(f"unexpected exo JSON at {where}.runnerToShard[{runner}]: "
                                     "runner has no node in nodeToRunner")
            entries.append((r2n[str(runner)], str(runner), shard))
    kinds = shards
    shards = [_shard_view(node, runner, shard, f"{where}.shard[{runner}]", kinds)
              for node, runner, shard in entries]
    if not shards:
        raise ExoSchemaError(f"unexpected exo JSON at {where}: the instance has no shards")
    shards.sort(key=lambda s: s.device_rank)
    return InstanceView(tag, body, instance_id, model_id, shards)


def _list_form(items: Any, where: str) -> list[tuple[str, str, Any]]:
    """The list form of ShardAssignments (`shards: [[node, runner, shard], ...]`, a newer exo)."""
    if not isinstance(items, list):
        raise ExoSchemaError(f"unexpected exo JSON at {where}: expected a list")
    out = []
    for i, it in enumerate(items):
        if isinstance(it, list) and len(it) == 3:
            out.append((str(it[0]), str(it[1]), it[2]))
        elif isinstance(it, dict):
            out.append((str(get(it, "nodeId", f"{where}[{i}]")),
                        str(get(it, "runnerId", f"{where}[{i}]")),
                        get(it, "shard", f"{where}[{i}]")))
        else:
            raise ExoSchemaError(f"unexpected exo JSON at {where}[{i}]: expected [node, runner, "
                                 "shard]")
    return out


def _shard_view(node: str, runner: str, shard: Any, where: str,
                kinds: tuple[str, ...] = KNOWN_SHARDS) -> ShardView:
    stag, sbody = untag(shard, kinds, f"shard of runner {runner}")
    try:
        return ShardView(runner_id=runner, node_id=node, tag=stag,
                         device_rank=int(get(sbody, "deviceRank", where)),
                         world_size=int(get(sbody, "worldSize", where)),
                         start_layer=int(get(sbody, "startLayer", where)),
                         end_layer=int(get(sbody, "endLayer", where)),
                         n_layers=int(get(sbody, "nLayers", where)), body=sbody)
    except (TypeError, ValueError):
        raise ExoSchemaError(f"unexpected exo JSON at {where}: rank and layer fields must be "
                             "integers") from None


# ---------------------------------------------------------------- model cards

# what exo's ModelCard requires (src/exo/shared/models/model_cards.py); the rest has defaults
CARD_REQUIRED = ("modelId", "storageSize", "nLayers", "hiddenSize", "supportsTensor", "tasks",
                 "backends")


@dataclass
class CardView:
    raw: dict  # the card as exo sent it, posted back unchanged
    model_id: str
    storage_bytes: int
    n_layers: int


def parse_card(raw: Any, where: str = "modelCard") -> CardView:
    """A model card with every field exo requires, or ExoSchemaError naming the missing one."""
    missing = [f for f in CARD_REQUIRED if isinstance(raw, dict) and key_of(raw, f) is None]
    if not isinstance(raw, dict) or missing:
        raise ExoSchemaError(f"unexpected exo JSON at {where}: a model card needs "
                             f"{', '.join(missing or CARD_REQUIRED)}; this exo version's model "
                             "card is not supported by exo-bridge")
    try:
        n = int(get(raw, "nLayers", where))
    except (TypeError, ValueError):
        raise ExoSchemaError(f"unexpected exo JSON at {where}.nLayers: not an integer") from None
    return CardView(raw, str(get(raw, "modelId", where)),
                    memory_bytes(get(raw, "storageSize", where), where + ".storageSize"), n)


def card_of_instance(inst: Any) -> dict | None:
    """The model card inside any tag-wrapped instance (any shard type), or None."""
    try:
        (_, body), = inst.items()
        sa = get(body, "shardAssignments", "instance")
        shards = sa.get("shards") if key_of(sa, "runnerToShard") is None else \
            list(get(sa, "runnerToShard", "instance").values())
        for sh in shards or []:
            if isinstance(sh, list):
                sh = sh[2]
            elif isinstance(sh, dict) and "shard" in sh:
                sh = sh["shard"]
            (_, sbody), = sh.items()
            card = get(sbody, "modelCard", "shard", required=False)
            if isinstance(card, dict):
                return card
    except (AttributeError, ValueError, TypeError, IndexError, UserError):
        return None
    return None


# ---------------------------------------------------------------- previews


@dataclass
class Preview:
    """One entry of `GET /instance/previews` (exo's PlacementPreview, snake_case keys)."""

    sharding: str
    instance_meta: str
    view: InstanceView | None  # None: no instance, or one of a kind the bridge does not use
    error: str | None
    card: dict | None  # the model card inside the instance, whatever its kind
    skipped: str | None = None  # why an instance that is there is not used


def parse_previews(data: Any, shards: tuple[str, ...] = KNOWN_SHARDS) -> list[Preview]:
    """Every entry of a previews answer. Entries with no instance (exo's `error` entries),
    ones whose shards are not of a kind in `shards` (Tensor ones, for a pipeline plan) and
    instance kinds this bridge does not know are kept with `view=None` and the reason: a
    client skips what it does not use."""
    items = get(data, "previews", "previews") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ExoSchemaError("unexpected exo JSON from /instance/previews: expected "
                             "{\"previews\": [...]}")
    out = []
    for i, p in enumerate(items):
        where = f"previews[{i}]"
        if not isinstance(p, dict):
            raise ExoSchemaError(f"unexpected exo JSON at {where}: expected an object")
        inst = get(p, "instance", where, required=False)
        error = get(p, "error", where, required=False)
        pv = Preview(str(get(p, "sharding", where, required=False, default="?")),
                     str(get(p, "instanceMeta", where, required=False, default="?")),
                     None, None if error is None else str(error),
                     card_of_instance(inst) if isinstance(inst, dict) else None)
        if inst:
            try:
                pv.view = parse_instance(inst, shards)
            except ExoSchemaError as e:
                pv.skipped = str(e)
        out.append(pv)
    return out


# ---------------------------------------------------------------- /state


@dataclass
class NodeInfo:
    node_id: str
    name: str | None = None
    ram_total: int | None = None
    ram_available: int | None = None


RING_PRIORITY = {"thunderbolt": 0, "maybe_ethernet": 1, "ethernet": 2, "wifi": 3, "unknown": 4}
COORDINATOR_PRIORITY = {"ethernet": 0, "wifi": 1, "unknown": 2, "maybe_ethernet": 3,
                        "thunderbolt": 4}


@dataclass
class Topology:
    """exo's connection graph: the address `src` reaches `sink` at, and RDMA interfaces."""

    nodes: list[str]
    socket_ips: dict[tuple[str, str], list[str]]
    rdma_iface: dict[tuple[str, str], str]  # (src, sink) -> src's interface
    iface_type: dict[str, dict[str, str]]  # node -> its ip -> interface type

    def ip(self, src: str, sink: str, ring: bool = True) -> str | None:
        """The address exo would use from src to sink: the ring prefers Thunderbolt, a jaccl
        coordinator ethernet (exo's own priorities); the first one listed on a tie."""
        ips = self.socket_ips.get((src, sink)) or []
        prio = RING_PRIORITY if ring else COORDINATOR_PRIORITY
        kinds = self.iface_type.get(sink, {})
        return min(ips, key=lambda ip: prio.get(kinds.get(ip, "unknown"), 2), default=None)


@dataclass
class ClusterState:
    nodes: dict[str, NodeInfo]
    topology: Topology | None
    instance_models: dict[str, str]  # instance id -> model id, for the instances exo has


def parse_state(state: Any) -> ClusterState:
    """Nodes, memory, topology and instances from `GET /state`."""
    nodes = parse_state_nodes(state)
    topo = _parse_topology(get(state, "topology", "state", required=False),
                           get(state, "nodeNetwork", "state", required=False) or {})
    models = {}
    for iid, inst in (get(state, "instances", "state", required=False) or {}).items():
        card = card_of_instance(inst) if isinstance(inst, dict) else None
        if card is not None:
            models[str(iid)] = str(get(card, "modelId", "state.instances", required=False))
    return ClusterState(nodes, topo, models)


def parse_state_nodes(state: Any) -> dict[str, NodeInfo]:
    """Node names and memory from `GET /state` (nodeIdentities/nodeMemory, or nodeProfiles)."""
    if not isinstance(state, dict):
        raise ExoSchemaError("unexpected exo JSON from /state: expected an object")
    nodes: dict[str, NodeInfo] = {}

    def node(nid: str) -> NodeInfo:
        return nodes.setdefault(str(nid), NodeInfo(str(nid)))

    for src in ("nodeIdentities", "nodeProfiles"):
        for nid, ident in _obj(get(state, src, "state", required=False), f"state.{src}").items():
            if isinstance(ident, dict):
                name = get(ident, "friendlyName", f"state.{src}", required=False)
                if name:
                    node(nid).name = str(name)
                mem = get(ident, "memory", f"state.{src}", required=False)
                if isinstance(mem, dict):
                    _read_memory(node(nid), mem, f"state.{src}[{nid}].memory")
    for nid, mem in _obj(get(state, "nodeMemory", "state", required=False),
                         "state.nodeMemory").items():
        if isinstance(mem, dict):
            _read_memory(node(nid), mem, f"state.nodeMemory[{nid}]")
    return nodes


def _obj(v: Any, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ExoSchemaError(f"unexpected exo JSON at {where}: expected an object, got "
                             f"{type(v).__name__}")
    return v


def _read_memory(info: NodeInfo, mem: dict, where: str) -> None:
    t = get(mem, "ramTotal", where, required=False)
    a = get(mem, "ramAvailable", where, required=False)
    if t is not None:
        info.ram_total = memory_bytes(t, where + ".ramTotal")
    if a is not None:
        info.ram_available = memory_bytes(a, where + ".ramAvailable")


def _multiaddr_ip(addr: Any) -> str | None:
    """The IP of a multiaddr `/ip4/10.0.0.2/tcp/52414` (or its computed `ip_address`)."""
    if not isinstance(addr, dict):
        return None
    text = addr.get("address")
    if isinstance(text, str):
        parts = text.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6"):
            return parts[2]
    ip = addr.get("ip_address", addr.get("ipAddress"))
    return ip if isinstance(ip, str) else None


def _parse_topology(topo: Any, network: Any) -> Topology | None:
    if not isinstance(topo, dict):
        return None
    conns = _obj(get(topo, "connections", "state.topology", required=False),
                 "state.topology.connections")
    ips: dict[tuple[str, str], list[str]] = {}
    rdma: dict[tuple[str, str], str] = {}
    for src, sinks in conns.items():
        for sink, edges in _obj(sinks, f"state.topology.connections[{src}]").items():
            for e in edges if isinstance(edges, list) else []:
                if not isinstance(e, dict):
                    continue
                ma = get(e, "sinkMultiaddr", "connection", required=False)
                iface = get(e, "sourceRdmaIface", "connection", required=False)
                if ma is not None and (ip := _multiaddr_ip(ma)):
                    ips.setdefault((str(src), str(sink)), []).append(ip)
                elif isinstance(iface, str):
                    rdma.setdefault((str(src), str(sink)), iface)
    kinds: dict[str, dict[str, str]] = {}
    for nid, info in (network.items() if isinstance(network, dict) else []):
        for itf in (get(info, "interfaces", "nodeNetwork", required=False) or []
                    if isinstance(info, dict) else []):
            if isinstance(itf, dict):
                ip = get(itf, "ipAddress", "interface", required=False)
                kind = get(itf, "interfaceType", "interface", required=False)
                if isinstance(ip, str):
                    kinds.setdefault(str(nid), {})[ip] = str(kind or "unknown")
    nodes = get(topo, "nodes", "state.topology", required=False)
    return Topology([str(n) for n in nodes] if isinstance(nodes, list) else [], ips, rdma, kinds)


# ---------------------------------------------------------------- events and errors


@dataclass
class AwaitEvent:
    """One `data:` event of `GET /instance/await`."""

    kind: str  # "ready", "timeout", or what exo sent
    instance_id: str | None = None
    message: str | None = None


def parse_event(text: str) -> AwaitEvent:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise ExoSchemaError(f"unexpected event from /instance/await: not JSON "
                             f"({text[:60]!r})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ExoSchemaError("unexpected event from /instance/await: no \"type\"")
    ev = AwaitEvent(obj["type"], message=str(obj["message"]) if "message" in obj else None)
    if ev.kind == "ready":
        inst = obj.get("instance")
        if not isinstance(inst, dict) or len(inst) != 1:
            raise ExoSchemaError("unexpected \"ready\" event from /instance/await: no "
                                 "tag-wrapped instance")
        (_, body), = inst.items()
        ev.instance_id = str(get(body, "instanceId", "ready event's instance"))
    return ev


def error_text(body: Any) -> str:
    """One line from an error answer: exo's `{"error": {"message": ...}}`, FastAPI's
    `{"detail": "..." | [{"loc": [...], "msg": ...}]}`, or plain text."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return _one_line(str(err["message"]))
        if isinstance(err, str):
            return _one_line(err)
        detail = body.get("detail")
        if isinstance(detail, str):
            return _one_line(detail)
        if isinstance(detail, list):
            parts = []
            for d in detail[:3]:
                if isinstance(d, dict):
                    loc = ".".join(str(x) for x in (d.get("loc") or [])[1:])
                    parts.append(f"{loc}: {d.get('msg')}" if loc else str(d.get("msg")))
            return _one_line("; ".join(parts) or json.dumps(detail))
    if isinstance(body, str):
        return _one_line(body) or "no detail"
    return _one_line(json.dumps(body)) if body is not None else "no detail"


def _one_line(text: str, n: int = 300) -> str:
    line = " ".join(text.split())
    return line[:n] + ("..." if len(line) > n else "")


# ---------------------------------------------------------------- rewriting


@dataclass
class Rank:
    """One rank of the rewritten instance: an exo node id and its half-open layer range."""

    node_id: str
    start_layer: int
    end_layer: int


def new_id() -> str:
    return str(uuid.uuid4())


def rewrite_instance(view: InstanceView, ranks: list[Rank], n_layers: int | None = None,
                     make_id: Callable[[], str] = new_id, topo: Topology | None = None) -> dict:
    """exo's instance rewritten so rank i runs `ranks[i]` (the plan's execution order).

    Fresh instance and runner ids; shard fields other than rank/world size/layers are kept from
    the node's shard in exo's placement; nodes exo placed that the plan does not use are
    dropped; per-rank fields (ring hosts, jaccl device matrix) are re-indexed, with addresses
    from exo's topology (`topo`, from /state) where it has them. A planned node that exo's
    placement does not include raises a UserError (use `build_instance` for those).
    """
    n = n_layers if n_layers is not None else view.n_layers
    if n != view.n_layers:
        raise UserError(f"the plan splits {n} layers but exo's model {view.model_id} has "
                        f"{view.n_layers}; re-plan for this model")
    by_node = {s.node_id: s for s in view.shards}
    lacking = [r.node_id for r in ranks if r.node_id not in by_node]
    if lacking:
        raise UserError(f"exo's placement for {view.model_id} uses nodes "
                        f"{', '.join(view.node_ids)}, not {', '.join(lacking)}; ask exo for a "
                        "placement over more nodes (--min-nodes) or map the plan's nodes to "
                        "these with --node-map")
    if len({r.node_id for r in ranks}) != len(ranks):
        raise UserError("the plan puts two stages on the same exo node; map each plan node to a "
                        "different exo node")
    body = copy.deepcopy(view.body)
    put(body, "instanceId", make_id())
    sa = get(body, "shardAssignments", view.tag)
    r2s, n2r = {}, {}
    world = len(ranks)
    for i, r in enumerate(ranks):
        old = by_node[r.node_id]
        shard = copy.deepcopy(old.body)
        put(shard, "deviceRank", i)
        put(shard, "worldSize", world)
        put(shard, "startLayer", r.start_layer)
        put(shard, "endLayer", r.end_layer)
        put(shard, "nLayers", n)
        runner = make_id()
        r2s[runner] = {old.tag: shard}
        n2r[r.node_id] = runner
    if key_of(sa, "runnerToShard") is None and "shards" in sa:  # list form
        dict_items = bool(sa["shards"]) and isinstance(sa["shards"][0], dict)
        items = []
        for node, runner in n2r.items():
            (tag, shard), = r2s[runner].items()
            items.append({key_of(sa["shards"][0], "nodeId") or "nodeId": node,
                          key_of(sa["shards"][0], "runnerId") or "runnerId": runner,
                          "shard": {tag: shard}} if dict_items else [node, runner, {tag: shard}])
        sa["shards"] = items
        put(sa, "primaryOutputNode", world - 1)  # pipeline: the last rank outputs
    else:
        put(sa, "runnerToShard", r2s)
        put(sa, "nodeToRunner", n2r)
    old_rank = {s.node_id: s.device_rank for s in view.shards}
    order = [r.node_id for r in ranks]
    if view.tag == "MlxRingInstance":
        _rewrite_ring(body, view, order, old_rank, topo)
    elif view.tag == "MlxJacclInstance":
        _rewrite_jaccl(body, view, order, old_rank, topo)
    return {view.tag: body}


def _host(h: Any, where: str) -> tuple[str, int]:
    return str(get(h, "ip", where)), int(get(h, "port", where))


def _rewrite_ring(body: dict, view: InstanceView, order: list[str], old_rank: dict,
                  topo: Topology | None) -> None:
    hk = key_of(body, "hostsByNode")
    if hk is None:
        flat = key_of(body, "hosts")  # older exo: one host per rank
        if flat is None:
            raise ExoSchemaError("unexpected exo JSON at MlxRingInstance: neither hostsByNode "
                                 "nor hosts")
        hosts = body[flat]
        if not isinstance(hosts, list) or len(hosts) != len(view.shards):
            raise ExoSchemaError("unexpected exo JSON at MlxRingInstance.hosts: expected one "
                                 "host per rank")
        body[flat] = [hosts[old_rank[n]] for n in order]
        return
    hbn = body[hk]
    if not isinstance(hbn, dict):
        raise ExoSchemaError("unexpected exo JSON at MlxRingInstance.hostsByNode: not an object")
    world = len(order)
    port = get(body, "ephemeralPort", "MlxRingInstance", required=False)

    def seen(u: str, v: str) -> dict | None:
        """A usable address of v: from u's connection to v in exo's topology, else as u saw it
        in the placement, else as any other node saw it."""
        ip = topo.ip(u, v) if topo is not None else None
        if ip is not None:
            return {"ip": ip, "port": port if port is not None else 0}
        for w in [u] + sorted(hbn):
            lst = hbn.get(w)
            if not isinstance(lst, list) or old_rank[v] >= len(lst):
                continue
            h = lst[old_rank[v]]
            ip, _ = _host(h, f"MlxRingInstance.hostsByNode[{w}]")
            if ip not in (PLACEHOLDER_IP, SELF_IP):
                return copy.deepcopy(h)
        return None

    new: dict[str, list] = {}
    for r, u in enumerate(order):
        own = hbn.get(u)
        if not isinstance(own, list) or len(own) != len(view.shards):
            raise ExoSchemaError(f"unexpected exo JSON at MlxRingInstance.hostsByNode[{u}]: "
                                 "expected one host per rank")
        lst = []
        for idx, v in enumerate(order):
            if idx == r:
                lst.append(copy.deepcopy(own[old_rank[u]]))
            elif world > 2 and idx not in ((r - 1) % world, (r + 1) % world):
                lst.append({"ip": PLACEHOLDER_IP, "port": 0})
            else:
                h = seen(u, v)
                if h is None:
                    raise UserError(f"exo's placement has no address for {v} that {u} can use, "
                                    "and the plan's rank order makes them ring neighbours; "
                                    "ask exo for a placement over these nodes in this order")
                if port is not None:
                    put(h, "port", port)
                lst.append(h)
        new[u] = lst
    body[hk] = new


def _rewrite_jaccl(body: dict, view: InstanceView, order: list[str], old_rank: dict,
                   topo: Topology | None) -> None:
    dk = key_of(body, "jacclDevices") or key_of(body, "ibvDevices")
    ck = key_of(body, "jacclCoordinators") or key_of(body, "ibvCoordinators")
    if dk is None or ck is None:
        raise ExoSchemaError("unexpected exo JSON at MlxJacclInstance: expected jacclDevices "
                             "and jacclCoordinators")
    m = body[dk]
    if not isinstance(m, list) or any(not isinstance(row, list) for row in m):
        raise ExoSchemaError("unexpected exo JSON at MlxJacclInstance.jacclDevices: not a matrix")
    body[dk] = [[m[old_rank[a]][old_rank[b]] for b in order] for a in order]
    rank0_old = view.shards[0].node_id
    coords = body[ck]
    if order[0] != rank0_old and topo is not None and isinstance(coords, dict):
        port = _port_of(next(iter(coords.values()), ""))
        body[ck] = jaccl_coordinators(order, topo, port)
        return
    if order[0] != rank0_old:
        raise UserError(f"a jaccl instance's coordinator is rank 0 ({rank0_old}) in exo's "
                        f"placement but the plan starts on {order[0]}; exo's placement carries no "
                        "coordinator address for it: use the ring backend (--instance-meta "
                        "MlxRing) or a plan that starts on exo's rank 0")
    if isinstance(coords, dict):
        body[ck] = {n: coords[n] for n in order if n in coords}


def _port_of(addr: Any) -> int:
    try:
        return int(str(addr).rsplit(":", 1)[1])
    except (IndexError, ValueError):
        raise ExoSchemaError(f"unexpected exo JSON in jacclCoordinators: {addr!r} is not "
                             "ip:port") from None


def jaccl_coordinators(order: list[str], topo: Topology, port: int) -> dict[str, str]:
    """node -> "ip:port" of rank 0 (`order[0]`) as that node reaches it (exo's rule)."""
    out = {}
    for n in order:
        ip = "0.0.0.0" if n == order[0] else topo.ip(n, order[0], ring=False)
        if ip is None:
            raise UserError(f"exo's topology has no connection from {n} to {order[0]}, the "
                            "jaccl coordinator (rank 0); start the plan on a node every node "
                            "reaches, or use --instance-meta MlxRing")
        out[n] = f"{ip}:{port}"
    return out


def ring_hosts(order: list[str], topo: Topology, port: int) -> dict[str, list[dict]]:
    """exo's ring host lists: at a node's own rank 0.0.0.0, at its two neighbours' ranks the
    address its connection reaches them at, elsewhere the placeholder."""
    world, hbn = len(order), {}
    for i, u in enumerate(order):
        lst = []
        for j, v in enumerate(order):
            if i == j:
                lst.append({"ip": SELF_IP, "port": port})
            elif world > 2 and j not in ((i - 1) % world, (i + 1) % world):
                lst.append({"ip": PLACEHOLDER_IP, "port": 0})
            else:
                ip = topo.ip(u, v)
                if ip is None:
                    raise UserError(f"exo's topology has no connection from {u} to {v}, and the "
                                    "plan's rank order makes them ring neighbours; re-plan with "
                                    "nodes exo has connected, in a ring order exo can use")
                lst.append({"ip": ip, "port": port})
        hbn[u] = lst
    return hbn


def jaccl_devices(order: list[str], topo: Topology) -> list[list[str | None]]:
    """[i][j]: rank i's RDMA interface towards rank j (None on the diagonal)."""
    matrix: list[list[str | None]] = []
    for a in order:
        row: list[str | None] = []
        for b in order:
            if a != b and (a, b) not in topo.rdma_iface:
                raise UserError(f"exo's topology has no RDMA connection from {a} to {b}; jaccl "
                                "needs RDMA between every pair: use --instance-meta MlxRing")
            row.append(None if a == b else topo.rdma_iface[(a, b)])
        matrix.append(row)
    return matrix


def build_instance(tag: str, card: CardView, ranks: list[Rank], topo: Topology, port: int,
                   make_id: Callable[[], str] = new_id,
                   shard_tag: str = PIPELINE_SHARD) -> dict:
    """An instance built from exo's state alone (no placement of exo's covers these nodes):
    shards (`shard_tag`: pipeline, or tensor with every rank [0, n_layers) as exo's
    get_shard_assignments_for_tensor_parallel writes them) carrying exo's model card, ring
    hosts or jaccl devices and coordinators from exo's topology, by exo's rules (self 0.0.0.0,
    ring neighbours at the address the connection reaches, others the placeholder)."""
    if len({r.node_id for r in ranks}) != len(ranks):
        raise UserError("the plan puts two stages on the same exo node; map each plan node to a "
                        "different exo node")
    world, order = len(ranks), [r.node_id for r in ranks]
    r2s, n2r = {}, {}
    for i, r in enumerate(ranks):
        runner = make_id()
        r2s[runner] = {shard_tag: {
            "modelCard": card.raw, "deviceRank": i, "worldSize": world,
            "startLayer": r.start_layer, "endLayer": r.end_layer, "nLayers": card.n_layers}}
        n2r[r.node_id] = runner
    body: dict[str, Any] = {"instanceId": make_id(),
                            "shardAssignments": {"modelId": card.model_id,
                                                 "runnerToShard": r2s, "nodeToRunner": n2r}}
    if tag == "MlxRingInstance":
        body["hostsByNode"], body["ephemeralPort"] = ring_hosts(order, topo, port), port
    elif tag == "MlxJacclInstance":
        body["jacclDevices"] = jaccl_devices(order, topo)
        body["jacclCoordinators"] = jaccl_coordinators(order, topo, port)
    else:
        raise ExoSchemaError(f"exo-bridge cannot build a {tag}; it knows "
                             f"{', '.join(KNOWN_INSTANCES)}")
    return {tag: body}


def tensor_cut_problem(card: CardView, ranks: int) -> str | None:
    """Why exo cannot run `ranks` equal Tensor ranks of this model, in exo's words, or None:
    supportsTensor, and hiddenSize and numKeyValueHeads divisible by the rank count
    (src/exo/master/placement.py place_instance; its loader divides heads by the group size,
    src/exo/worker/engines/mlx/auto_parallel.py). `POST /instance` checks neither."""
    raw = card.raw
    if not get(raw, "supportsTensor", "modelCard", required=False, default=False):
        return ("Requested Tensor sharding but this model does not support tensor "
                f"parallelism: {card.model_id}")
    hidden = get(raw, "hiddenSize", "modelCard")
    kv = get(raw, "numKeyValueHeads", "modelCard", required=False)
    if not isinstance(hidden, int) or hidden % ranks or (isinstance(kv, int) and kv % ranks):
        return (f"No tensor sharding found for model with hidden_size={hidden}"
                + (f", num_key_value_heads={kv}" if kv is not None else "")
                + f" across {ranks} nodes")
    return None


def exo_layer_bytes(card: CardView, layers: int) -> int:
    """The memory exo's placement charges a node for `layers` layers: every layer costs
    storage_size / n_layers (src/exo/master/placement_utils.py, integer division)."""
    return card.storage_bytes * layers // card.n_layers


def post_body(instance: dict) -> dict:
    """The body of `POST /instance`: `{"instance": <tag-wrapped instance>}`."""
    return {"instance": instance}


def await_path(model_id: str, timeout_s: float) -> str:
    """`GET /instance/await` with exo's own timeout (0..300 s; 0 would wait forever)."""
    t = min(300.0, max(0.1, float(timeout_s)))
    return "/instance/await?" + urlencode({"model_id": model_id, "timeout_seconds": f"{t:g}"})


def previews_path(model_id: str, node_ids: list[str] | None = None) -> str:
    """`GET /instance/previews`, limited to cycles containing `node_ids` when given."""
    q = [("model_id", model_id)] + [("node_ids", n) for n in sorted(node_ids or [])]
    return "/instance/previews?" + urlencode(q)


def instance_path(instance_id: str) -> str:
    return "/instance/" + quote(instance_id, safe="")


META_TAGS = {"MlxRing": "MlxRingInstance", "MlxJaccl": "MlxJacclInstance"}


def instance_summary(view: InstanceView) -> list[tuple[int, str, int, int]]:
    """(rank, node, start, end) per rank, for printing."""
    return [(s.device_rank, s.node_id, s.start_layer, s.end_layer) for s in view.shards]
