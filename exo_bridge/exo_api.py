"""Current exo's JSON schema: the ONLY module of the bridge that knows it.

Current exo (the 2025+ rewrite, snapshot b5375f8) serialises pydantic models tag-wrapped with
camelCase keys, and accepts snake_case on input::

    {"MlxRingInstance": {
        "instanceId": "...",
        "shardAssignments": {
            "modelId": "mlx-community/...",
            "runnerToShard": {RUNNER: {"PipelineShardMetadata": {
                "modelCard": {"modelId": ..., "storageSize": {"inBytes": N}, "nLayers": 32, ...},
                "deviceRank": 0, "worldSize": 2, "startLayer": 0, "endLayer": 16,
                "nLayers": 32}}},
            "nodeToRunner": {NODE: RUNNER}},
        "hostsByNode": {NODE: [{"ip": ..., "port": ...}, ...one per rank...]},
        "ephemeralPort": 52416}}

`MlxJacclInstance` carries `jacclDevices` (a rank x rank matrix) and `jacclCoordinators`
(node -> "ip:port" of rank 0) instead of hosts. Layer ranges are half-open. A newer
`ShardAssignments` (open upstream work) lists `shards: [[node, runner, shard], ...]` in rank order
with `primaryOutputNode` (the last rank for a pipeline); both forms are read and written back in
the form they came in. Older exo's `MlxRingInstance.hosts` (one host per rank) is re-indexed too.

What this module does: parse an instance (or a placement preview list, or /state) into small
views, rewrite an instance's ranks to a measured split (fresh ids, the rest of exo's fields kept
as they came, per-rank fields re-indexed), and build the POST body. Any shape it does not know
raises `ExoSchemaError` with one line naming what was unexpected; the schema is still moving
upstream, so this is where a new shape gets taught.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlencode

from profiler.errors import UserError

KNOWN_INSTANCES = ("MlxRingInstance", "MlxJacclInstance")
KNOWN_SHARDS = ("PipelineShardMetadata",)
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
    return int(get(v, "inBytes", where))


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


def parse_instance(data: Any) -> InstanceView:
    """A tag-wrapped instance (optionally inside `{"instance": ...}`) -> InstanceView."""
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
    shards = [_shard_view(node, runner, shard, f"{where}.shard[{runner}]")
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


def _shard_view(node: str, runner: str, shard: Any, where: str) -> ShardView:
    stag, sbody = untag(shard, KNOWN_SHARDS, f"shard of runner {runner}")
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


def parse_previews(data: Any) -> list[InstanceView]:
    """`GET /instance/previews` -> the candidate instances it lists (errors skipped)."""
    items = get(data, "previews", "previews") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ExoSchemaError("unexpected exo JSON from /instance/previews: expected a list "
                             "of previews")
    out = []
    for i, p in enumerate(items):
        inst = get(p, "instance", f"previews[{i}]", required=False)
        if inst:
            out.append(parse_instance(inst))
    return out


@dataclass
class NodeInfo:
    node_id: str
    name: str | None = None
    ram_total: int | None = None
    ram_available: int | None = None


def parse_state_nodes(state: Any) -> dict[str, NodeInfo]:
    """Node names and memory from `GET /state` (nodeIdentities/nodeMemory, or nodeProfiles)."""
    if not isinstance(state, dict):
        raise ExoSchemaError("unexpected exo JSON from /state: expected an object")
    nodes: dict[str, NodeInfo] = {}

    def node(nid: str) -> NodeInfo:
        return nodes.setdefault(str(nid), NodeInfo(str(nid)))

    for src in ("nodeIdentities", "nodeProfiles"):
        for nid, ident in (get(state, src, "state", required=False) or {}).items():
            if isinstance(ident, dict):
                name = get(ident, "friendlyName", f"state.{src}", required=False)
                if name:
                    node(nid).name = str(name)
                mem = get(ident, "memory", f"state.{src}", required=False)
                if isinstance(mem, dict):
                    _read_memory(node(nid), mem, f"state.{src}[{nid}].memory")
    for nid, mem in (get(state, "nodeMemory", "state", required=False) or {}).items():
        if isinstance(mem, dict):
            _read_memory(node(nid), mem, f"state.nodeMemory[{nid}]")
    return nodes


def _read_memory(info: NodeInfo, mem: dict, where: str) -> None:
    t = get(mem, "ramTotal", where, required=False)
    a = get(mem, "ramAvailable", where, required=False)
    if t is not None:
        info.ram_total = memory_bytes(t, where + ".ramTotal")
    if a is not None:
        info.ram_available = memory_bytes(a, where + ".ramAvailable")


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
                     make_id: Callable[[], str] = new_id) -> dict:
    """exo's instance rewritten so rank i runs `ranks[i]` (the plan's execution order).

    Fresh instance and runner ids; shard fields other than rank/world size/layers are kept from
    the node's shard in exo's placement; nodes exo placed that the plan does not use are
    dropped; per-rank fields (ring hosts, jaccl device matrix) are re-indexed. A planned node
    that exo's placement does not include raises a UserError (exo's placement carries no
    addresses for it).
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
        _rewrite_ring(body, view, order, old_rank)
    elif view.tag == "MlxJacclInstance":
        _rewrite_jaccl(body, view, order, old_rank)
    return {view.tag: body}


def _host(h: Any, where: str) -> tuple[str, int]:
    return str(get(h, "ip", where)), int(get(h, "port", where))


def _rewrite_ring(body: dict, view: InstanceView, order: list[str], old_rank: dict) -> None:
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
        """A usable address of v: as u saw it, else as any other node saw it."""
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


def _rewrite_jaccl(body: dict, view: InstanceView, order: list[str], old_rank: dict) -> None:
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
    if order[0] != rank0_old:
        raise UserError(f"a jaccl instance's coordinator is rank 0 ({rank0_old}) in exo's "
                        f"placement but the plan starts on {order[0]}; exo's placement carries no "
                        "coordinator address for it: use the ring backend (--instance-meta "
                        "MlxRing) or a plan that starts on exo's rank 0")
    coords = body[ck]
    if isinstance(coords, dict):
        body[ck] = {n: coords[n] for n in order if n in coords}


def post_body(instance: dict) -> dict:
    """The body of `POST /instance`: `{"instance": <tag-wrapped instance>}`."""
    return {"instance": instance}


def placement_path(model_id: str, sharding: str = "Pipeline", instance_meta: str = "MlxRing",
                   min_nodes: int = 1) -> str:
    """`GET /instance/placement?...` for exo's own placement of this model."""
    return "/instance/placement?" + urlencode({"model_id": model_id, "sharding": sharding,
                                               "instance_meta": instance_meta,
                                               "min_nodes": min_nodes})


def await_path(model_id: str) -> str:
    return "/instance/await?" + urlencode({"model_id": model_id})


def previews_path(model_id: str) -> str:
    return "/instance/previews?" + urlencode({"model_id": model_id})


def instance_summary(view: InstanceView) -> list[tuple[int, str, int, int]]:
    """(rank, node, start, end) per rank, for printing."""
    return [(s.device_rank, s.node_id, s.start_layer, s.end_layer) for s in view.shards]
