"""A small, real, exo-shaped HTTP API for the bridge's tests (and for demos).

It speaks current exo's JSON (tag-wrapped instances, camelCase keys, snake_case accepted on
input) on the endpoints the bridge uses, and validates what it receives the way exo's pydantic
types and master would: a known instance tag, contiguous ranks 0..worldSize-1, one world size,
half-open layer ranges that cover all layers in rank order, nodes it knows, a model card that
exists, and a cluster whose total memory holds the model. It records every accepted instance.
Rejections are HTTP 400 with `{"detail": "..."}`.

Endpoints: GET /node_id, GET /state, GET /instance/placement, GET /instance/previews,
POST /instance, GET /instance/await, POST /place_instance.

The validator is written independently of `exo_bridge.exo_api` on purpose: it checks the bridge
rather than agreeing with it. Run standalone for a demo::

    python tests/exo_server.py --port 52415 --node studio:64:48 --node mini:16:12
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

GIB = 1024 ** 3

MODEL_CARDS = {
    "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit": (32, 4_637_851_648, 4096),
    "mlx-community/Llama-3.3-70B-Instruct-4bit": (80, 40_652_242_944, 8192),
    "mlx-community/Llama-3.2-1B-Instruct-4bit": (16, 729_808_896, 2048),
}


def model_card(model_id: str, n_layers: int, storage: int, hidden: int) -> dict:
    return {"modelId": model_id, "storageSize": {"inBytes": storage}, "nLayers": n_layers,
            "hiddenSize": hidden, "supportsTensor": True, "tasks": ["TextGeneration"],
            "family": "llama", "quantization": "4bit", "baseModel": "", "capabilities": []}


@dataclass
class FakeNode:
    node_id: str
    name: str
    ram_total: int
    ram_available: int
    ip: str = "10.0.0.1"


class Reject(Exception):
    """Becomes HTTP 400 with the message."""


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def to_snake_keys(obj: Any, keep: tuple[str, ...] = ("runnerToShard", "nodeToRunner",
                                                     "hostsByNode", "jacclCoordinators")) -> Any:
    """exo accepts snake_case field names on input: the same JSON with snake_case keys (the
    keys of id-keyed maps are ids, not field names, and stay as they are)."""
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


def field_(d: Any, name: str, where: str) -> Any:
    """exo's pydantic models accept the camelCase alias or the snake_case field name."""
    if not isinstance(d, dict):
        raise Reject(f"{where}: expected an object")
    if name in d:
        return d[name]
    if _snake(name) in d:
        return d[_snake(name)]
    raise Reject(f"{where}: field required: {name}")


def int_(d: Any, name: str, where: str, ge: int = 0) -> int:
    v = field_(d, name, where)
    if isinstance(v, bool) or not isinstance(v, int):
        raise Reject(f"{where}.{name}: must be an integer, got {v!r}")
    if v < ge:
        raise Reject(f"{where}.{name}: must be >= {ge}")
    return v


@dataclass
class ExoState:
    nodes: list[FakeNode]
    cards: dict[str, dict] = field(default_factory=dict)
    instances: dict[str, dict] = field(default_factory=dict)  # id -> tag-wrapped instance
    posted: list[dict] = field(default_factory=list)  # raw bodies accepted by POST /instance
    requests: list[tuple[str, str]] = field(default_factory=list)
    # tests: rewrite what GET /instance/placement answers (snake_case keys, unknown shapes)
    placement_transform: Any = None
    state_available: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def node(self, nid: str) -> FakeNode | None:
        return next((n for n in self.nodes if n.node_id == nid), None)

    # ---------------- exo's placement: smallest cycle that holds the model, RAM-proportional
    def place(self, model_id: str, sharding: str, meta: str, min_nodes: int) -> dict:
        card = self.cards.get(model_id)
        if card is None:
            raise Reject(f"model card not found: {model_id}")
        if sharding != "Pipeline":
            raise Reject(f"sharding {sharding} not supported here")
        if meta not in ("MlxRing", "MlxJaccl"):
            raise Reject(f"instance_meta {meta} not supported here")
        size = card["storageSize"]["inBytes"]
        n_layers = card["nLayers"]
        chosen = None
        for k in range(max(1, min_nodes), len(self.nodes) + 1):
            cycle = self.nodes[:k]
            if sum(n.ram_available for n in cycle) >= size:
                chosen = cycle
                break
        if chosen is None:
            raise Reject(f"no cycle of at least {min_nodes} nodes has enough memory for {model_id}")
        if len(chosen) > n_layers:
            raise Reject("more nodes than layers")
        total = sum(n.ram_available for n in chosen)
        raw = [n_layers * n.ram_available / total for n in chosen]
        counts = [max(1, int(r)) for r in raw]
        left = n_layers - sum(counts)
        order = sorted(range(len(chosen)), key=lambda i: (-(raw[i] - int(raw[i])), i))
        for i in order[:max(0, left)]:
            counts[i] += 1
        while sum(counts) > n_layers:  # the at-least-one rule overshot
            i = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[i] -= 1
        r2s, n2r, start = {}, {}, 0
        for rank, (n, c) in enumerate(zip(chosen, counts)):
            runner = str(uuid.uuid4())
            r2s[runner] = {"PipelineShardMetadata": {
                "modelCard": card, "deviceRank": rank, "worldSize": len(chosen),
                "startLayer": start, "endLayer": start + c, "nLayers": n_layers}}
            n2r[n.node_id] = runner
            start += c
        body: dict[str, Any] = {"instanceId": str(uuid.uuid4()),
                                "shardAssignments": {"modelId": model_id, "runnerToShard": r2s,
                                                     "nodeToRunner": n2r}}
        w = len(chosen)
        if meta == "MlxRing":
            port = 52416
            hbn = {}
            for r, n in enumerate(chosen):
                lst = []
                for idx, o in enumerate(chosen):
                    if idx == r:
                        lst.append({"ip": "0.0.0.0", "port": port})
                    elif w > 2 and idx not in ((r - 1) % w, (r + 1) % w):
                        lst.append({"ip": "198.51.100.1", "port": 0})
                    else:
                        lst.append({"ip": o.ip, "port": port})
                hbn[n.node_id] = lst
            body["hostsByNode"] = hbn
            body["ephemeralPort"] = port
            return {"MlxRingInstance": body}
        body["jacclDevices"] = [[None if a == b else f"rdma_en{b}" for b in range(w)]
                                for a in range(w)]
        body["jacclCoordinators"] = {n.node_id: ("0.0.0.0" if i == 0 else chosen[0].ip) + ":52417"
                                     for i, n in enumerate(chosen)}
        return {"MlxJacclInstance": body}

    # ---------------- what exo's types and master check on POST /instance
    def validate(self, instance: Any) -> tuple[str, str, dict]:
        if not isinstance(instance, dict) or len(instance) != 1:
            raise Reject("instance: expected one tag, e.g. {\"MlxRingInstance\": {...}}")
        (tag, body), = instance.items()
        if tag not in ("MlxRingInstance", "MlxJacclInstance"):
            raise Reject(f"instance: unknown instance type {tag}")
        iid = field_(body, "instanceId", tag)
        if not isinstance(iid, str) or not iid:
            raise Reject(f"{tag}.instanceId: must be a non-empty string")
        if iid in self.instances:
            raise Reject(f"{tag}.instanceId: instance {iid} already exists")
        sa = field_(body, "shardAssignments", tag)
        model_id = field_(sa, "modelId", "shardAssignments")
        card = self.cards.get(model_id)
        if card is None:
            raise Reject(f"model card not found: {model_id}")
        if "shards" in sa and "runnerToShard" not in sa and "runner_to_shard" not in sa:
            r2s, n2r = self._list_form(sa)
        else:
            r2s = field_(sa, "runnerToShard", "shardAssignments")
            n2r = field_(sa, "nodeToRunner", "shardAssignments")
        if not isinstance(r2s, dict) or not isinstance(n2r, dict) or not r2s:
            raise Reject("shardAssignments: runnerToShard and nodeToRunner must be non-empty "
                         "objects")
        if sorted(n2r.values()) != sorted(r2s) or len(set(n2r.values())) != len(n2r):
            raise Reject("shardAssignments: nodeToRunner must map each node to one runner of "
                         "runnerToShard")
        for nid in n2r:
            if self.node(nid) is None:
                raise Reject(f"shardAssignments.nodeToRunner: unknown node {nid}")
        shards = []
        runner_node = {r: n for n, r in n2r.items()}
        for runner, tagged in r2s.items():
            w = f"runnerToShard[{runner}]"
            if not isinstance(tagged, dict) or list(tagged) != ["PipelineShardMetadata"]:
                raise Reject(f"{w}: expected {{\"PipelineShardMetadata\": {{...}}}}")
            s = tagged["PipelineShardMetadata"]
            mc = field_(s, "modelCard", w)
            if field_(mc, "modelId", w + ".modelCard") != model_id:
                raise Reject(f"{w}.modelCard: model differs from shardAssignments.modelId")
            shards.append((int_(s, "deviceRank", w), int_(s, "worldSize", w, 1),
                           int_(s, "startLayer", w), int_(s, "endLayer", w),
                           int_(s, "nLayers", w), runner_node[runner]))
        shards.sort()
        world = len(shards)
        if [s[0] for s in shards] != list(range(world)):
            raise Reject(f"ranks must be contiguous 0..{world - 1}, got {[s[0] for s in shards]}")
        if any(s[1] != world for s in shards):
            raise Reject(f"worldSize must be {world} on every shard")
        n_layers = card["nLayers"]
        expect = 0
        for rank, _, start, end, n, _node in shards:
            if n != n_layers:
                raise Reject(f"rank {rank}: nLayers {n} but the model has {n_layers}")
            if start != expect or end <= start:
                raise Reject(f"rank {rank}: layers [{start}, {end}) do not continue from "
                             f"{expect} (half-open ranges must cover all layers in rank order)")
            expect = end
        if expect != n_layers:
            raise Reject(f"layers end at {expect}, the model has {n_layers}")
        placed = [s[5] for s in shards]
        if tag == "MlxRingInstance":
            hbn = field_(body, "hostsByNode", tag)
            if not isinstance(hbn, dict) or sorted(hbn) != sorted(placed):
                raise Reject(f"{tag}.hostsByNode: must have exactly the instance's nodes")
            for nid, lst in hbn.items():
                if not isinstance(lst, list) or len(lst) != world:
                    raise Reject(f"{tag}.hostsByNode[{nid}]: one host per rank expected")
                for h in lst:
                    field_(h, "ip", f"hostsByNode[{nid}]")
                    int_(h, "port", f"hostsByNode[{nid}]")
            int_(body, "ephemeralPort", tag)
        else:
            m = field_(body, "jacclDevices", tag)
            if not isinstance(m, list) or len(m) != world or any(
                    not isinstance(r, list) or len(r) != world for r in m):
                raise Reject(f"{tag}.jacclDevices: a {world}x{world} matrix expected")
            c = field_(body, "jacclCoordinators", tag)
            if not isinstance(c, dict) or sorted(c) != sorted(placed):
                raise Reject(f"{tag}.jacclCoordinators: must have exactly the instance's nodes")
        total = sum(n.ram_total for n in self.nodes)
        if total < card["storageSize"]["inBytes"]:
            raise Reject(f"the cluster's memory ({total} B) cannot hold {model_id}")
        return tag, iid, body

    @staticmethod
    def _list_form(sa: dict) -> tuple[dict, dict]:
        """The newer ShardAssignments: `shards: [[node, runner, shard]]` + primaryOutputNode."""
        items = sa["shards"]
        if not isinstance(items, list) or not items:
            raise Reject("shardAssignments.shards: a non-empty list expected")
        r2s, n2r = {}, {}
        for i, it in enumerate(items):
            if isinstance(it, dict):
                it = [field_(it, "nodeId", "shards"), field_(it, "runnerId", "shards"),
                      field_(it, "shard", "shards")]
            if not isinstance(it, list) or len(it) != 3:
                raise Reject(f"shardAssignments.shards[{i}]: [node, runner, shard] expected")
            node, runner, shard = it
            if not isinstance(shard, dict) or list(shard) != ["PipelineShardMetadata"]:
                raise Reject(f"shardAssignments.shards[{i}]: a PipelineShardMetadata expected")
            body = shard["PipelineShardMetadata"]
            if body.get("deviceRank", body.get("device_rank")) != i:
                raise Reject("shard position does not correspond to device rank")
            r2s[runner], n2r[node] = shard, runner
        if int_(sa, "primaryOutputNode", "shardAssignments") != len(items) - 1:
            raise Reject("primary output node does not correspond to primary shard")
        return r2s, n2r

    def accept(self, instance: dict) -> str:
        with self.lock:
            tag, iid, _ = self.validate(instance)
            self.instances[iid] = instance
            self.posted.append(instance)
            return iid

    def instance_for(self, model_id: str) -> dict | None:
        for inst in self.instances.values():
            (_, body), = inst.items()
            sa = field_(body, "shardAssignments", "instance")
            if field_(sa, "modelId", "shardAssignments") == model_id:
                return inst
        return None

    def state(self) -> dict:
        return {
            "instances": self.instances,
            "nodeIdentities": {n.node_id: {"modelId": "Mac", "chipId": "Apple M",
                                           "friendlyName": n.name} for n in self.nodes},
            "nodeMemory": {n.node_id: {"ramTotal": {"inBytes": n.ram_total},
                                       "ramAvailable": {"inBytes": n.ram_available},
                                       "swapTotal": {"inBytes": 0},
                                       "swapAvailable": {"inBytes": 0}} for n in self.nodes},
        }


def _handler(state: ExoState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                return json.loads(raw or b"null")
            except json.JSONDecodeError:
                raise Reject("body is not valid JSON") from None

        def _run(self, method: str) -> None:
            url = urlparse(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            state.requests.append((method, self.path))
            try:
                code, obj = self.route(method, url.path, q)
            except Reject as e:
                code, obj = 400, {"detail": str(e)}
            self._send(code, obj)

        def route(self, method: str, path: str, q: dict) -> tuple[int, Any]:
            if method == "GET" and path == "/node_id":
                return 200, state.nodes[0].node_id
            if method == "GET" and path == "/state" and state.state_available:
                return 200, state.state()
            if method == "GET" and path == "/instance/placement":
                if "model_id" not in q:
                    raise Reject("query parameter required: model_id")
                inst = state.place(q["model_id"], q.get("sharding", "Pipeline"),
                                   q.get("instance_meta", "MlxRing"), int(q.get("min_nodes", 1)))
                if state.placement_transform is not None:
                    inst = state.placement_transform(inst)
                return 200, inst
            if method == "GET" and path == "/instance/previews":
                if "model_id" not in q:
                    raise Reject("query parameter required: model_id")
                previews = []
                for meta in ("MlxRing", "MlxJaccl"):
                    for k in range(1, len(state.nodes) + 1):
                        try:
                            inst, err = state.place(q["model_id"], "Pipeline", meta, k), None
                        except Reject as e:
                            inst, err = None, str(e)
                        # PlacementPreview is a plain (snake_case) model in exo
                        previews.append({"model_id": q["model_id"], "sharding": "Pipeline",
                                         "instance_meta": meta, "instance": inst,
                                         "memory_delta_by_node": None, "error": err})
                return 200, {"previews": previews}
            if method == "POST" and path == "/instance":
                body = self._body()
                if not isinstance(body, dict) or "instance" not in body:
                    raise Reject("body: field required: instance")
                iid = state.accept(body["instance"])
                return 200, {"message": "Command received.", "commandId": str(uuid.uuid4()),
                             "instanceId": iid}
            if method == "POST" and path == "/place_instance":
                body = self._body()
                mid = field_(body, "modelId", "body")
                inst = state.place(mid, body.get("sharding", "Pipeline"),
                                   body.get("instance_meta", body.get("instanceMeta", "MlxRing")),
                                   int(body.get("min_nodes", body.get("minNodes", 1))))
                iid = state.accept(inst)
                return 200, {"message": "Command received.", "commandId": str(uuid.uuid4()),
                             "instanceId": iid}
            if method == "GET" and path == "/instance/await":
                if "model_id" not in q:
                    raise Reject("query parameter required: model_id")
                deadline = time.monotonic() + float(q.get("timeout", 2))
                while True:
                    inst = state.instance_for(q["model_id"])
                    if inst is not None:
                        return 200, {"instance": inst, "ready": True}
                    if time.monotonic() > deadline:
                        return 404, {"detail": f"no instance of {q['model_id']}"}
                    time.sleep(0.05)
            return 404, {"detail": "Not Found"}

        def do_GET(self):  # noqa: N802
            self._run("GET")

        def do_POST(self):  # noqa: N802
            self._run("POST")

    return Handler


class ExoServer:
    """`with ExoServer(nodes) as srv:` -> `srv.url`, `srv.state` (records), on 127.0.0.1:port."""

    def __init__(self, nodes: list[FakeNode] | None = None, cards: dict | None = None,
                 port: int = 0) -> None:
        nodes = nodes or [FakeNode("node-a", "studio", 64 * GIB, 48 * GIB, "10.0.0.1"),
                          FakeNode("node-b", "mini", 16 * GIB, 12 * GIB, "10.0.0.2")]
        if cards is None:
            cards = {m: model_card(m, *v) for m, v in MODEL_CARDS.items()}
        self.state = ExoState(nodes=nodes, cards=cards)
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
    ap = argparse.ArgumentParser(description="exo-shaped test API")
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
    print(f"exo-shaped API on {srv.url}; nodes: "
          + ", ".join(f"{n.name}={n.node_id}" for n in srv.state.nodes), flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
