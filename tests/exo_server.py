"""A small, real HTTP server that behaves like current exo's API, for the bridge's tests.

Written from reading exo's own handlers, placement and types at snapshot b5375f8 (no exo code
copied). Each behaviour it reproduces, and the exo file it comes from:

- `GET /instance/previews?model_id=M[&node_ids=..]` lists a preview for EVERY sharding
  (Pipeline, Tensor) x backend (MlxRing, MlxJaccl) x min_nodes 1..N, deduplicated by
  (sharding, backend, node count); a failed placement is an entry with `instance: null` and an
  `error`, listed once per (sharding, backend); Tensor previews carry `TensorShardMetadata`
  shards over all layers; `node_ids` keeps only cycles containing those nodes; an empty
  topology answers `{"previews": []}`; a model card that cannot be loaded is HTTP 400
  "Failed to load model card: ..."; preview keys are snake_case, the instance inside camelCase
  (src/exo/api/main.py get_placement_previews, src/exo/api/types/api.py PlacementPreview).
- Placement: simple cycles of the directed connection graph plus single nodes; cycles with at
  least min_nodes nodes (containing the required nodes) whose summed AVAILABLE RAM holds the
  model; Tensor needs supports_tensor and hidden size / KV heads divisible by the node count;
  the smallest such cycles; nodes' backends must serve the instance type; MlxJaccl needs an
  all-RDMA cycle; cycles with a leaf node first; then the most available RAM (first one wins);
  one node forces Pipeline/MlxRing; layers proportional to available RAM, largest remainder,
  at least one per node, in CYCLE order (not the order nodes were listed); each node checked
  with every layer costing storage_size // n_layers ("Node i (id) has insufficient memory");
  ring hosts: self 0.0.0.0, neighbours the connection's address, others 198.51.100.1:0; jaccl:
  device matrix from RDMA interfaces, coordinators from each node's connection to rank 0
  (src/exo/master/placement.py, src/exo/master/placement_utils.py, src/exo/shared/topology.py).
- `GET /instance/placement` answers exo's own choice (camelCase), ValueError -> HTTP 400.
- `POST /instance` validates the body's SHAPE like exo's strict pydantic types (tags, required
  fields, no extra fields, integer types, port range, runners that exist; HTTP 422 with
  FastAPI's `{"detail": [...]}`), then checks ONLY that the model's storage size fits the sum
  of all nodes' available RAM (HTTP 400). Contiguity, coverage and per-node memory are NOT
  checked, as in exo ("TODO: validate against topology"): the bridge's own validation is what
  protects the user (src/exo/api/main.py create_instance, src/exo/master/placement.py
  add_instance_to_placements, src/exo/shared/types/worker/*.py, src/exo/utils/pydantic_ext.py).
  The instance appears in the state `apply_delay_s` later (the master applies the command).
- `GET /instance/await?model_id=M&timeout_seconds=T` is a server-sent event stream: a
  `: keep-alive` comment at once and every `keepalive_s` (exo: 10 s), then one
  `data: {"type": "ready", "instance": ...}` (snake_case keys: exo's model_dump_json) for the
  first instance of the model, or `data: {"type": "timeout", ...}` after T seconds; T = 0 (the
  default) waits forever; T outside 0..300 is HTTP 422; chunked, `Connection: close`
  (src/exo/api/main.py await_instance, src/exo/api/keepalive.py).
- Errors raised as HTTPException are `{"error": {"message", "type", "param", "code"}}` bodies
  (src/exo/api/main.py http_exception_handler, src/exo/api/types/api.py ErrorResponse).
- Model cards: built-in cards are cached; any other id is "fetched from Hugging Face" (after
  `hub_delay_s`, cached once fetched); an unknown repo or an offline hub fails, and the handlers
  that do not catch it answer HTTP 500 "Internal Server Error" in plain text (placement,
  POST /instance) (src/exo/shared/models/model_cards.py ModelCard.load, fetch_from_hf;
  src/exo/download/download_utils.py download_file_with_retry). Cards carry exo's required
  fields (modelId, storageSize, nLayers, hiddenSize, supportsTensor, tasks, backends, ...).
- Tensor instances: placement keeps only cycles whose size divides hiddenSize and
  numKeyValueHeads (and a card with supportsTensor), then shards EVERY rank over all layers
  [0, n_layers) as TensorShardMetadata, device rank = position in the cycle, world size = cycle
  length; a one-node cycle is forced to Pipeline/MlxRing; no per-node memory check (only the
  cycle's total) (src/exo/master/placement.py place_instance,
  src/exo/master/placement_utils.py get_shard_assignments_for_tensor_parallel).
  `POST /instance` accepts a TensorShardMetadata instance with the same shape checks and the
  same total-memory check as a Pipeline one, and NOT the divisibility (exo's loader divides
  the heads by the group size, src/exo/worker/engines/mlx/auto_parallel.py
  LlamaShardingStrategy): `check_runnable` asserts what the Tensor loader relies on.
- `GET /state` (camelCase: instances, topology {nodes, connections}, nodeIdentities, nodeMemory,
  nodeNetwork, nodeBackends, nodeRdmaCtl), `GET /models`, `GET /node_id`,
  `GET /instance/{id}` (404 error body until it exists), `POST /place_instance`.

Simplifications: one address per node; download progress is not modelled (every cycle scores
0); the cycle enumeration is a depth-first search in connection order, so cycle order is
deterministic but not necessarily rustworkx's own order.

Run standalone to try `exo-bridge place`::

    python tests/exo_server.py --port 52415 --node studio:64:48 --node mini:16:12
"""

from __future__ import annotations

import argparse
import json
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

GIB = 1024 ** 3
RING_PLACEHOLDER = "198.51.100.1"
META_BACKENDS = {"MlxRing": ["MlxMetal", "MlxCuda", "MlxCpu"], "MlxJaccl": ["MlxMetal"]}

# model id -> (n_layers, storage bytes, hidden size); exo's built-in cards for these ids
MODEL_CARDS = {
    "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit": (32, 4_637_851_648, 4096),
    "mlx-community/Llama-3.3-70B-Instruct-4bit": (80, 40_652_242_944, 8192),
    "mlx-community/Llama-3.2-1B-Instruct-4bit": (16, 729_808_896, 2048),
}


def model_card(model_id: str, n_layers: int, storage: int, hidden: int, kv_heads: int = 8,
               supports_tensor: bool = True) -> dict:
    """A model card as exo serialises it (camelCase, every field of exo's ModelCard)."""
    return {"modelId": model_id, "storageSize": {"inBytes": storage}, "nLayers": n_layers,
            "hiddenSize": hidden, "supportsTensor": supports_tensor,
            "numKeyValueHeads": kv_heads, "tasks": ["TextGeneration"], "components": None,
            "family": "llama", "quantization": "4bit", "baseModel": "", "capabilities": ["text"],
            "backends": ["MlxMetal", "MlxCuda", "MlxCpu"], "reasoningDialect": "none",
            "contextLength": 131072, "usesCfg": False, "trustRemoteCode": True,
            "isCustom": False, "vision": None,
            "samplingDefaults": {"temperature": 0.6, "topP": 0.9, "topK": None, "minP": None,
                                 "repetitionPenalty": None, "presencePenalty": None,
                                 "frequencyPenalty": None, "thinking": None,
                                 "nonThinking": None}}


@dataclass
class FakeNode:
    node_id: str
    name: str
    ram_total: int
    ram_available: int
    ip: str = "10.0.0.1"
    backends: tuple[str, ...] = ("MlxMetal",)


class ApiError(Exception):
    """An HTTPException: becomes `{"error": {...}}` with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Invalid(Exception):
    """A request validation error: HTTP 422 `{"detail": [...]}` (FastAPI's shape)."""

    def __init__(self, loc: list, msg: str, kind: str = "value_error", value: Any = None):
        super().__init__(msg)
        self.detail = [{"type": kind, "loc": loc, "msg": msg, "input": value}]


class CardLoadError(Exception):
    """ModelCard.load failed (an id exo has not cached and cannot fetch)."""


class PlacementError(ValueError):
    """exo's placement raised ValueError."""


# ---------------------------------------------------------------- key styles


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


ID_KEYED = ("runnerToShard", "nodeToRunner", "hostsByNode", "jacclCoordinators")


def to_snake_keys(obj: Any, keep: tuple[str, ...] = ID_KEYED) -> Any:
    """The same JSON with snake_case field names (what exo's model_dump_json writes, and what
    its types accept on input). Keys of id-keyed maps are ids and stay; tags stay."""
    if isinstance(obj, list):
        return [to_snake_keys(v, keep) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        if k in keep and isinstance(v, dict):
            out[_snake(k)] = {ik: to_snake_keys(iv, keep) for ik, iv in v.items()}
        elif k[:1].isupper():  # a tag (MlxRingInstance, PipelineShardMetadata)
            out[k] = to_snake_keys(v, keep)
        else:
            out[_snake(k)] = to_snake_keys(v, keep)
    return out


# ---------------------------------------------------------------- exo's types, as a validator

_INT, _STR, _BOOL, _FLOAT = "int", "str", "bool", "float"
MEMORY = {"in_bytes": (_INT, False)}
CARD = {"model_id": (_STR, True), "storage_size": (MEMORY, True), "n_layers": ("pos", True),
        "hidden_size": ("pos", True), "supports_tensor": (_BOOL, True),
        "num_key_value_heads": ("pos?", False), "tasks": ("tasks", True),
        "components": ("any", False), "family": (_STR, False), "quantization": (_STR, False),
        "base_model": (_STR, False), "capabilities": ("strs", False),
        "backends": ("backends", True), "reasoning_dialect": (_STR, False),
        "context_length": (_INT, False), "uses_cfg": (_BOOL, False),
        "trust_remote_code": (_BOOL, False), "is_custom": (_BOOL, False),
        "vision": ("any", False), "sampling_defaults": ("any", False)}
SHARD = {"model_card": (CARD, True), "device_rank": (_INT, True), "world_size": (_INT, True),
         "immediate_exception": (_BOOL, False), "should_timeout": ("float?", False),
         "start_layer": ("nonneg", True), "end_layer": ("nonneg", True),
         "n_layers": ("nonneg", True)}
SHARD_TAGS = {"PipelineShardMetadata": SHARD, "TensorShardMetadata": SHARD,
              "CfgShardMetadata": {**SHARD, "cfg_rank": (_INT, True),
                                   "cfg_world_size": (_INT, False),
                                   "pipeline_rank": (_INT, True),
                                   "pipeline_world_size": (_INT, True)}}
HOST = {"ip": (_STR, True), "port": ("port", True)}
ASSIGN = {"model_id": (_STR, True), "runner_to_shard": ("shards", True),
          "node_to_runner": ("strmap", True)}
INSTANCE_TAGS = {
    "MlxRingInstance": {"instance_id": (_STR, True), "shard_assignments": (ASSIGN, True),
                        "hosts_by_node": ("hosts", True), "ephemeral_port": (_INT, True)},
    "MlxJacclInstance": {"instance_id": (_STR, True), "shard_assignments": (ASSIGN, True),
                         "jaccl_devices": ("matrix", True),
                         "jaccl_coordinators": ("strmap", True)},
}


def _check_scalar(kind: str, v: Any, loc: list) -> None:
    def bad(msg: str, t: str) -> Invalid:
        return Invalid(loc, msg, t, v)

    is_int = isinstance(v, int) and not isinstance(v, bool)
    if kind in (_INT, "pos", "nonneg", "port", "pos?") and not (kind == "pos?" and v is None):
        if not is_int:
            raise bad("Input should be a valid integer", "int_type")
        if kind == "pos" and v <= 0 or kind == "pos?" and v <= 0:
            raise bad("Input should be greater than 0", "greater_than")
        if kind == "nonneg" and v < 0:
            raise bad("Input should be greater than or equal to 0", "greater_than_equal")
        if kind == "port" and not 0 <= v <= 65535:
            raise bad("Value error, Port must be between 0 and 65535", "value_error")
    elif kind == _STR and not isinstance(v, str):
        raise bad("Input should be a valid string", "string_type")
    elif kind == _BOOL and not isinstance(v, bool):
        raise bad("Input should be a valid boolean", "bool_type")
    elif kind == "float?" and v is not None and (isinstance(v, bool)
                                                 or not isinstance(v, (int, float))):
        raise bad("Input should be a valid number", "float_type")
    elif kind in ("tasks", "backends", "strs"):
        allowed = {"tasks": {"TextGeneration", "TextToImage", "ImageToImage"},
                   "backends": {"MlxMetal", "MlxCpu", "MlxCuda", "Vllm"}}.get(kind)
        if not isinstance(v, list) or any(not isinstance(x, str) for x in v):
            raise bad("Input should be a valid list of strings", "list_type")
        if allowed and any(x not in allowed for x in v):
            raise bad(f"Input should be one of {sorted(allowed)}", "enum")


def validate_model(data: Any, spec: dict, loc: list) -> dict:
    """What exo's strict, extra-forbidding pydantic models check: fields by camelCase alias or
    snake_case name, required ones present, no others, strict types. Returns snake_case keys."""
    if not isinstance(data, dict):
        raise Invalid(loc, "Input should be a valid dictionary or object", "model_type", data)
    out: dict = {}
    for key, v in data.items():
        name = _snake(key)
        if name not in spec:
            raise Invalid(loc + [key], "Extra inputs are not permitted", "extra_forbidden", v)
        out[name] = v
    for name, (kind, required) in spec.items():
        if name not in out:
            if required:
                raise Invalid(loc + [_camel(name)], "Field required", "missing", data)
            continue
        v, here = out[name], loc + [name]
        if isinstance(kind, dict):
            out[name] = validate_model(v, kind, here)
        elif kind == "shards":
            out[name] = {r: validate_tagged(s, SHARD_TAGS, here + [r]) for r, s in
                         _mapping(v, here).items()}
        elif kind == "strmap":
            for k2, v2 in _mapping(v, here).items():
                _check_scalar(_STR, v2, here + [k2])
        elif kind == "hosts":
            hosts = {}
            for k2, lst in _mapping(v, here).items():
                if not isinstance(lst, list):
                    raise Invalid(here + [k2], "Input should be a valid list", "list_type", lst)
                hosts[k2] = [validate_model(h, HOST, here + [k2, i]) for i, h in enumerate(lst)]
            out[name] = hosts
        elif kind == "matrix":
            if not isinstance(v, list) or any(not isinstance(r, list) for r in v) or any(
                    x is not None and not isinstance(x, str) for r in v for x in r):
                raise Invalid(here, "Input should be a list of lists of strings or null",
                              "list_type", v)
        elif kind != "any":
            _check_scalar(kind, v, here)
    return out


def _mapping(v: Any, loc: list) -> dict:
    if not isinstance(v, dict):
        raise Invalid(loc, "Input should be a valid dictionary", "dict_type", v)
    return v


def validate_tagged(data: Any, tags: dict, loc: list) -> dict:
    if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in tags:
        raise Invalid(loc, f"Input should be one of {', '.join(tags)} (tag-wrapped)",
                      "union_tag_invalid", data)
    (tag, body), = data.items()
    return {tag: validate_model(body, tags[tag], loc + [tag])}


def validate_instance(data: Any, loc: list) -> tuple[str, dict]:
    """exo's `Instance` union; also ShardAssignments' check that every runner exists."""
    (tag, body), = validate_tagged(data, INSTANCE_TAGS, loc).items()
    sa = body["shard_assignments"]
    for runner in sa["node_to_runner"].values():
        if runner not in sa["runner_to_shard"]:
            raise Invalid(loc + [tag, "shard_assignments"],
                          f"Value error, Runner {runner} in node_to_runner does not exist in "
                          "runner_to_shard", "value_error", None)
    return tag, body


# ---------------------------------------------------------------- the state exo keeps


@dataclass
class ExoState:
    nodes: list[FakeNode]
    cards: dict[str, dict] = field(default_factory=dict)  # exo's cached model cards
    hub: dict[str, dict] = field(default_factory=dict)  # cards "on Hugging Face"
    hub_online: bool = True
    hub_delay_s: float = 0.0
    links: list[tuple[str, str]] | None = None  # directed socket links; None = full mesh
    rdma: bool = False  # RDMA connections between every pair, rdma_ctl enabled
    keepalive_s: float = 10.0
    honour_timeout: bool = True  # tests only: False makes a peer that never sends "timeout"
    apply_delay_s: float = 0.0
    instances: dict[str, dict] = field(default_factory=dict)  # id -> camelCase instance
    posted: list[dict] = field(default_factory=list)  # instances accepted by POST /instance
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ---------------- topology (src/exo/shared/topology.py)
    def node(self, nid: str) -> FakeNode | None:
        return next((n for n in self.nodes if n.node_id == nid), None)

    def edges(self) -> list[tuple[str, str]]:
        if self.links is not None:
            return list(self.links)
        return [(a.node_id, b.node_id) for a in self.nodes for b in self.nodes if a is not b]

    def successors(self, nid: str) -> list[str]:
        out: list[str] = []
        for a, b in self.edges():
            if a == nid and b not in out:
                out.append(b)
        return out

    def cycles(self) -> list[list[str]]:
        """Simple cycles of the directed graph (DFS in connection order), then every node."""
        ids = [n.node_id for n in self.nodes]
        index = {n: i for i, n in enumerate(ids)}
        found: list[list[str]] = []

        def dfs(start: str, path: list[str]) -> None:
            for nxt in self.successors(path[-1]):
                if nxt == start and len(path) > 1:
                    found.append(list(path))
                elif nxt not in path and index[nxt] > index[start]:
                    dfs(start, path + [nxt])

        for s in ids:
            dfs(s, [s])
        return found + [[n] for n in ids]

    def is_leaf(self, nid: str) -> bool:
        return len(self.successors(nid)) <= 1

    def rdma_cycle(self, cycle: list[str]) -> bool:
        """Every link inside the cycle has an RDMA connection and every node has rdma_ctl
        enabled: both hold exactly when `rdma` is set."""
        return self.rdma

    # ---------------- model cards (src/exo/shared/models/model_cards.py)
    def load_card(self, model_id: str) -> dict:
        if model_id in self.cards:
            return self.cards[model_id]
        if self.hub_delay_s:
            time.sleep(self.hub_delay_s)
        if not self.hub_online:
            raise CardLoadError(f"Cannot connect to host huggingface.co:443 ssl:default "
                                f"[Name or service not known] (downloading config.json for "
                                f"{model_id})")
        if model_id not in self.hub:
            raise CardLoadError(f"File not found: https://huggingface.co/{model_id}/resolve/"
                                "main/config.json")
        self.cards[model_id] = self.hub[model_id]
        return self.cards[model_id]

    # ---------------- placement (src/exo/master/placement.py, placement_utils.py)
    def place(self, card: dict, sharding: str, meta: str, min_nodes: int,
              required: set[str] | None = None) -> dict:
        """exo's place_instance: the cycle, then the shards, then the backend's addresses."""
        best = self.choose_cycle(card, sharding, meta, min_nodes, required)
        if len(best) == 1:
            sharding, meta = "Pipeline", "MlxRing"
        return self.instance(card, best, sharding, meta)

    def choose_cycle(self, card: dict, sharding: str, meta: str, min_nodes: int,
                     required: set[str] | None) -> list[str]:
        storage = card["storageSize"]["inBytes"]
        avail = {n.node_id: n.ram_available for n in self.nodes}
        cands = [c for c in self.cycles() if len(c) >= min_nodes]
        if required:
            cands = [c for c in cands if required <= set(c)]
        cands = [c for c in cands if sum(avail[n] for n in c) >= storage]
        if not cands:
            raise PlacementError("No cycles found with sufficient memory")
        if sharding == "Tensor":
            if not card["supportsTensor"]:
                raise PlacementError("Requested Tensor sharding but this model does not "
                                     f"support tensor parallelism: {card['modelId']}")
            kv = card.get("numKeyValueHeads")
            cands = [c for c in cands if card["hiddenSize"] % len(c) == 0
                     and (kv is None or kv % len(c) == 0)]
            if not cands:
                raise PlacementError(f"No tensor sharding found for model with hidden_size="
                                     f"{card['hiddenSize']}, num_key_value_heads={kv} across "
                                     "candidate cycles")
        smallest = min(len(c) for c in cands)
        cands = [c for c in cands if len(c) == smallest]
        backends = set(META_BACKENDS[meta]) & set(card["backends"])
        if not backends:
            raise PlacementError(f"Model {card['modelId']} backends cannot satisfy engine {meta}")
        cands = [c for c in cands if all(set(self.node(n).backends) & backends for n in c)]
        if not cands:
            raise PlacementError(f"No cycle where every node supports a backend in "
                                 f"{sorted(backends)} for {card['modelId']}")
        if meta == "MlxJaccl":
            cands = [c for c in cands if self.rdma_cycle(c)]
            if not cands:
                raise PlacementError("Requested RDMA (MlxJaccl) but no RDMA-connected cycles "
                                     "available")
        leafy = [c for c in cands if any(self.is_leaf(n) for n in c)]
        cands = leafy or cands
        best = cands[0]
        for c in cands[1:]:  # the most available RAM; the first one wins a tie
            if sum(avail[n] for n in c) > sum(avail[n] for n in best):
                best = c
        return best

    def instance(self, card: dict, best: list[str], sharding: str, meta: str) -> dict:
        storage, n_layers = card["storageSize"]["inBytes"], card["nLayers"]
        avail = {n.node_id: n.ram_available for n in self.nodes}
        if sharding == "Pipeline":
            counts = layers_by_memory(n_layers, [avail[n] for n in best])
            for i, (n, k) in enumerate(zip(best, counts)):
                need = storage * k // n_layers
                if need > avail[n]:
                    raise PlacementError(
                        f"Node {i} ({n}) has insufficient memory: requires "
                        f"{need / GIB:.2f} GB for {k} layers, but only has "
                        f"{avail[n] / GIB:.2f} GB available")
            ranges, start = [], 0
            for k in counts:
                ranges.append((start, start + k))
                start += k
        else:
            ranges = [(0, n_layers)] * len(best)
        shard_tag = "PipelineShardMetadata" if sharding == "Pipeline" else "TensorShardMetadata"
        r2s, n2r = {}, {}
        for rank, (n, (a, b)) in enumerate(zip(best, ranges)):
            runner = str(uuid.uuid4())
            r2s[runner] = {shard_tag: {"modelCard": card, "deviceRank": rank,
                                       "worldSize": len(best), "immediateException": False,
                                       "shouldTimeout": None, "startLayer": a, "endLayer": b,
                                       "nLayers": n_layers}}
            n2r[n] = runner
        body = {"instanceId": str(uuid.uuid4()),
                "shardAssignments": {"modelId": card["modelId"], "runnerToShard": r2s,
                                     "nodeToRunner": n2r}}
        port = ephemeral_port()
        if meta == "MlxRing":
            body["hostsByNode"] = self.ring_hosts(best, port)
            body["ephemeralPort"] = port
            return {"MlxRingInstance": body}
        body["jacclDevices"] = [[None if a == b else f"rdma_en{self.nodes.index(self.node(b))}"
                                 for b in best] for a in best]
        body["jacclCoordinators"] = {
            n: ("0.0.0.0" if n == best[0] else self.ip(n, best[0])) + f":{port}" for n in best}
        return {"MlxJacclInstance": body}

    def ip(self, src: str, sink: str) -> str:
        if (src, sink) not in self.edges():
            raise PlacementError("MLX ring backend requires connectivity between neighbouring "
                                 "nodes")
        return self.node(sink).ip

    def ring_hosts(self, cycle: list[str], port: int) -> dict:
        w, out = len(cycle), {}
        for r, n in enumerate(cycle):
            lst = []
            for i, o in enumerate(cycle):
                if i == r:
                    lst.append({"ip": "0.0.0.0", "port": port})
                elif i not in ((r - 1) % w, (r + 1) % w):
                    lst.append({"ip": RING_PLACEHOLDER, "port": 0})
                else:
                    lst.append({"ip": self.ip(n, o), "port": port})
            out[n] = lst
        return out

    def previews(self, model_id: str, required: set[str] | None) -> list[dict]:
        """src/exo/api/main.py get_placement_previews, entry by entry."""
        if not self.nodes:
            return []
        try:
            card = self.load_card(model_id)
        except CardLoadError as e:
            raise ApiError(400, f"Failed to load model card: {e}") from None
        out, seen = [], set()
        for sharding in ("Pipeline", "Tensor"):
            for meta in ("MlxRing", "MlxJaccl"):
                for k in range(1, len(self.nodes) + 1):
                    try:
                        inst = self.place(card, sharding, meta, k, required)
                    except PlacementError as e:
                        if (sharding, meta, 0) not in seen:
                            out.append({"model_id": model_id, "sharding": sharding,
                                        "instance_meta": meta, "instance": None,
                                        "memory_delta_by_node": None, "error": str(e)})
                        seen.add((sharding, meta, 0))
                        continue
                    (_, body), = inst.items()
                    nodes = list(body["shardAssignments"]["nodeToRunner"])
                    total = card["storageSize"]["inBytes"]
                    delta = {n: total // len(nodes) + (1 if i < total % len(nodes) else 0)
                             for i, n in enumerate(sorted(nodes))}
                    if (sharding, meta, len(nodes)) not in seen:
                        out.append({"model_id": model_id, "sharding": sharding,
                                    "instance_meta": meta, "instance": inst,
                                    "memory_delta_by_node": delta, "error": None})
                    seen.add((sharding, meta, len(nodes)))
        return out

    # ---------------- POST /instance (src/exo/api/main.py create_instance)
    def create(self, body: Any) -> dict:
        if not isinstance(body, dict) or "instance" not in body:
            raise Invalid(["body", "instance"], "Field required", "missing", body)
        extra = [k for k in body if k != "instance"]
        if extra:
            raise Invalid(["body", extra[0]], "Extra inputs are not permitted",
                          "extra_forbidden", body[extra[0]])
        instance = body["instance"]
        tag, parsed = validate_instance(instance, ["body", "instance"])
        model_id = parsed["shard_assignments"]["model_id"]
        card = self.load_card(model_id)  # CardLoadError -> HTTP 500
        need = card["storageSize"]["inBytes"]
        have = sum(n.ram_available for n in self.nodes)
        if need > have:
            raise ApiError(400, f"Insufficient memory to create instance. Required: "
                                f"{need / GIB:.1f}GB, Available: {have / GIB:.1f}GB")
        with self.lock:
            self.posted.append(instance)
        iid = parsed["instance_id"]

        def apply() -> None:
            with self.lock:
                self.instances[iid] = instance

        if self.apply_delay_s:
            threading.Timer(self.apply_delay_s, apply).start()
        else:
            apply()
        return {"message": "Command received.", "command_id": str(uuid.uuid4()),
                "model_card": card}

    def instance_for(self, model_id: str) -> dict | None:
        with self.lock:
            for inst in self.instances.values():
                (_, body), = inst.items()
                sa = body.get("shardAssignments", body.get("shard_assignments"))
                if sa.get("modelId", sa.get("model_id")) == model_id:
                    return inst
        return None

    def state(self) -> dict:
        conns: dict = {}
        for a, b in self.edges():
            ip = self.node(b).ip
            lst = conns.setdefault(a, {}).setdefault(b, [])
            lst.append({"sinkMultiaddr": {"address": f"/ip4/{ip}/tcp/52414",
                                          "address_type": "ip4", "ip_address": ip,
                                          "port": 52414}})
            if self.rdma:
                lst.append({"sourceRdmaIface": f"rdma_en{self.nodes.index(self.node(b))}",
                            "sinkRdmaIface": f"rdma_en{self.nodes.index(self.node(a))}"})
        return {
            "instances": dict(self.instances), "runners": {}, "downloads": {}, "tasks": {},
            "lastSeen": {}, "lastEventAppliedIdx": len(self.posted) - 1,
            "topology": {"nodes": [n.node_id for n in self.nodes], "connections": conns},
            "nodeIdentities": {n.node_id: {"modelId": "Mac", "chipId": "Apple M",
                                           "friendlyName": n.name, "osVersion": "26.0",
                                           "osBuildVersion": "x"} for n in self.nodes},
            "nodeMemory": {n.node_id: {"ramTotal": {"inBytes": n.ram_total},
                                       "ramAvailable": {"inBytes": n.ram_available},
                                       "swapTotal": {"inBytes": 0},
                                       "swapAvailable": {"inBytes": 0}} for n in self.nodes},
            "nodeNetwork": {n.node_id: {"interfaces": [{"name": "en0", "ipAddress": n.ip,
                                                        "interfaceType": "ethernet"}]}
                            for n in self.nodes},
            "nodeBackends": {n.node_id: list(n.backends) for n in self.nodes},
            "nodeRdmaCtl": {n.node_id: {"enabled": self.rdma} for n in self.nodes},
        }


def check_runnable(instance: dict, state: ExoState) -> list[tuple[int, str, int, int]]:
    """What exo's runners rely on and exo's API does NOT check (tests call it on what the
    bridge posted): ranks 0..w-1 with one world size and one shard kind; Pipeline: half-open
    layer ranges covering every layer in rank order; Tensor: every rank all layers and a
    group size dividing the model's hidden size and KV heads (exo's loader divides them);
    the model's layer count, known nodes, and per backend: ring hosts
    with 0.0.0.0 at the node's own rank and the neighbours' real addresses, or a jaccl matrix
    and coordinators pointing at rank 0. Returns (rank, node, start, end) per rank; raises
    AssertionError naming what is wrong."""
    tag, body = validate_instance(instance, ["instance"])
    sa = body["shard_assignments"]
    node_of = {r: n for n, r in sa["node_to_runner"].items()}
    ranks, kinds = [], set()
    for runner, tagged in sa["runner_to_shard"].items():
        (stag, sh), = tagged.items()
        assert stag in ("PipelineShardMetadata", "TensorShardMetadata"), stag
        kinds.add(stag)
        ranks.append((sh["device_rank"], node_of[runner], sh["start_layer"], sh["end_layer"],
                      sh["world_size"], sh["n_layers"], sh["model_card"]))
    assert len(kinds) == 1, f"mixed shard kinds {sorted(kinds)}"
    ranks.sort()
    w = len(ranks)
    assert [r[0] for r in ranks] == list(range(w)), "ranks not 0..w-1"
    assert all(r[4] == w for r in ranks), "world sizes differ"
    card = state.cards[sa["model_id"]]
    tensor = kinds == {"TensorShardMetadata"}
    if tensor:
        kv = card.get("numKeyValueHeads")
        assert card["supportsTensor"], "model does not support tensor parallelism"
        assert card["hiddenSize"] % w == 0 and (kv is None or kv % w == 0), \
            f"hidden {card['hiddenSize']} / KV heads {kv} not divisible by {w} ranks"
    expect = 0
    for rank, node, a, b, _, n, mc in ranks:
        assert state.node(node) is not None, f"unknown node {node}"
        if tensor:
            assert n == card["nLayers"] and (a, b) == (0, n), f"tensor rank {rank}: [{a}, {b})"
        else:
            assert n == card["nLayers"] and a == expect and b > a, f"rank {rank}: [{a}, {b})"
        assert (mc.get("modelId") or mc.get("model_id")) == sa["model_id"], "model card"
        expect = b
    assert expect == card["nLayers"], f"layers end at {expect}"
    order = [r[1] for r in ranks]
    if tag == "MlxRingInstance":
        hbn = body["hosts_by_node"]
        assert sorted(hbn) == sorted(order), "hostsByNode nodes"
        for i, u in enumerate(order):
            assert len(hbn[u]) == w and hbn[u][i]["ip"] == "0.0.0.0", f"{u}: own rank"
            for j in {(i - 1) % w, (i + 1) % w} - {i}:
                assert hbn[u][j]["ip"] == state.node(order[j]).ip, f"{u}: neighbour {j}"
    else:
        m = body["jaccl_devices"]
        assert len(m) == w and all(len(r) == w for r in m), "jaccl matrix size"
        c = body["jaccl_coordinators"]
        assert c[order[0]].startswith("0.0.0.0:"), "rank 0 coordinates"
        for n in order[1:]:
            assert c[n].split(":")[0] == state.node(order[0]).ip, f"{n}: coordinator"
    return [(r[0], r[1], r[2], r[3]) for r in ranks]


def ephemeral_port() -> int:
    """exo's random ephemeral port (49153..65535, never its API port 52415)."""
    p = random.randint(49153, 65535)
    return p - 1 if p <= 52415 else p


def layers_by_memory(n_layers: int, avail: list[int]) -> list[int]:
    """Layers in proportion to available RAM: floors, then the leftover layers to the largest
    remainders (earlier node on a tie), then at least one layer per node taken from the node
    with the most."""
    n = len(avail)
    if n_layers < n:
        raise PlacementError(f"Cannot distribute {n_layers} layers across {n} nodes (need at "
                             "least 1 layer per node)")
    total = sum(avail)
    raw = [n_layers * a / total for a in avail]
    counts = [int(r) for r in raw]
    by_rem = sorted(range(n), key=lambda i: -(raw[i] - counts[i]))
    for i in by_rem[:n_layers - sum(counts)]:
        counts[i] += 1
    for i in range(n):
        if counts[i] == 0:
            j = max(range(n), key=lambda x: counts[x])
            counts[j] -= 1
            counts[i] = 1
    return counts


# ---------------------------------------------------------------- HTTP


def _handler(state: ExoState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, obj: Any, text: str | None = None) -> None:
            data = (text if text is not None else json.dumps(obj)).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8" if text is not None
                             else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                return json.loads(raw or b"null")
            except json.JSONDecodeError as e:
                raise Invalid(["body", e.pos], "JSON decode error", "json_invalid",
                              {}) from None

        def _run(self, method: str) -> None:
            url = urlparse(self.path)
            q = parse_qs(url.query)
            state.requests.append((method, self.path))
            try:
                self.route(method, url.path, q)
            except ApiError as e:
                self._send(e.status, {"error": {"message": str(e),
                                                "type": HTTPStatus(e.status).phrase,
                                                "param": None, "code": e.status}})
            except Invalid as e:
                self._send(422, {"detail": e.detail})
            except (CardLoadError, PlacementError):  # unhandled in exo's handler
                self._send(500, None, text="Internal Server Error")

        def query(self, q: dict, name: str, default: Any = None) -> Any:
            if name in q:
                return q[name][-1]
            if default is None:
                raise Invalid(["query", name], "Field required", "missing", None)
            return default

        def route(self, method: str, path: str, q: dict) -> None:
            if method == "GET" and path == "/node_id":
                return self._send(200, state.nodes[0].node_id)
            if method == "GET" and path == "/state":
                return self._send(200, state.state())
            if method == "GET" and path == "/models":
                return self._send(200, {"object": "list", "data": [
                    {"id": m, "hugging_face_id": m, "storage_size_megabytes":
                     round(c["storageSize"]["inBytes"] / 2 ** 20)}
                    for m, c in state.cards.items()]})
            if method == "GET" and path == "/instance/placement":
                card = state.load_card(self.query(q, "model_id"))
                try:
                    inst = state.place(card, self.query(q, "sharding", "Pipeline"),
                                       self.query(q, "instance_meta", "MlxRing"),
                                       int(self.query(q, "min_nodes", "1")))
                except PlacementError as e:
                    raise ApiError(400, str(e)) from None
                return self._send(200, inst)
            if method == "GET" and path == "/instance/previews":
                required = set(q.get("node_ids", [])) or None
                return self._send(200, {"previews": state.previews(self.query(q, "model_id"),
                                                                   required)})
            if method == "POST" and path == "/instance":
                return self._send(200, state.create(self._body()))
            if method == "POST" and path == "/place_instance":
                body = self._body()
                card = state.load_card(body["model_id"])
                try:
                    inst = state.place(card, body.get("sharding", "Pipeline"),
                                       body.get("instance_meta", "MlxRing"),
                                       int(body.get("min_nodes", 1)))
                except PlacementError:  # exo's master logs it; the API has already answered
                    inst = None
                if inst is not None:
                    (_, b), = inst.items()
                    with state.lock:
                        state.instances[b["instanceId"]] = inst
                return self._send(200, {"message": "Command received.",
                                        "command_id": str(uuid.uuid4()), "model_card": card})
            if method == "GET" and path == "/instance/await":
                return self.await_instance(q)
            if method == "GET" and path.startswith("/instance/"):
                iid = path.split("/", 2)[2]
                with state.lock:
                    inst = state.instances.get(iid)
                if inst is None:
                    raise ApiError(404, "Instance not found")
                return self._send(200, inst)
            return self._send(404, None, text="Not Found")

        def await_instance(self, q: dict) -> None:
            model_id = self.query(q, "model_id")
            try:
                t = float(self.query(q, "timeout_seconds", "0"))
            except ValueError:
                raise Invalid(["query", "timeout_seconds"], "Input should be a valid number",
                              "float_parsing", q["timeout_seconds"][-1]) from None
            if not 0 <= t <= 300:
                raise Invalid(["query", "timeout_seconds"], "Input should be less than or "
                              "equal to 300" if t > 300 else "Input should be greater than or "
                              "equal to 0", "less_than_equal" if t > 300 else
                              "greater_than_equal", t)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.close_connection = True

            def chunk(text: str) -> None:
                data = text.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                chunk(": keep-alive\n\n")
                deadline = None if t == 0 or not state.honour_timeout else time.monotonic() + t
                next_ka = time.monotonic() + state.keepalive_s
                while True:
                    inst = state.instance_for(model_id)
                    if inst is not None:
                        msg = {"type": "ready", "instance": to_snake_keys(inst)}
                        chunk(f"data: {json.dumps(msg)}\n\n")
                        break
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        msg = {"type": "timeout",
                               "message": f"No instance found for model {model_id}"}
                        chunk(f"data: {json.dumps(msg)}\n\n")
                        break
                    if now >= next_ka:
                        chunk(": keep-alive\n\n")
                        next_ka = now + state.keepalive_s
                    time.sleep(0.02)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client went away
                pass

        def do_GET(self):  # noqa: N802
            self._run("GET")

        def do_POST(self):  # noqa: N802
            self._run("POST")

    return Handler


class ExoServer:
    """`with ExoServer(nodes) as srv:` -> `srv.url`, `srv.state`, on 127.0.0.1:port."""

    def __init__(self, nodes: list[FakeNode] | None = None, cards: dict | None = None,
                 port: int = 0, **state_kw) -> None:
        nodes = nodes or [FakeNode("node-a", "studio", 64 * GIB, 48 * GIB, "10.0.0.1"),
                          FakeNode("node-b", "mini", 16 * GIB, 12 * GIB, "10.0.0.2")]
        if cards is None:
            cards = {m: model_card(m, *v) for m, v in MODEL_CARDS.items()}
        self.state = ExoState(nodes=nodes, cards=cards, **state_kw)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self.state))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "ExoServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "ExoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="an exo-like API for trying exo-bridge place")
    ap.add_argument("--port", type=int, default=52415)
    ap.add_argument("--node", action="append", default=[],
                    help="NAME:TOTAL_GIB:AVAILABLE_GIB (node id is node-NAME)")
    a = ap.parse_args()
    nodes = []
    for i, spec in enumerate(a.node):
        name, total, avail = spec.split(":")
        nodes.append(FakeNode(f"node-{name}", name, int(float(total) * GIB),
                              int(float(avail) * GIB), f"10.0.0.{i + 1}"))
    srv = ExoServer(nodes or None, port=a.port)
    print(f"exo-like API on {srv.url}; nodes: "
          + ", ".join(f"{n.name}={n.node_id}" for n in srv.state.nodes), flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
