"""`exo-bridge place`: run a measured plan on current exo through its HTTP API.

    exo-bridge place --plan PLAN.json --api http://HOST:52415 --model MODEL_ID [--dry-run]

1. `GET /state`: exo's nodes (names, available RAM), its topology (which node reaches which
   at which address, RDMA interfaces) and its instances;
2. map the plan's nodes to exo node ids: `--node-map FILE` (JSON `{plan node: exo node id}`),
   else a plan node that IS an exo node id, else exo's friendly name;
3. `GET /instance/previews?model_id=M&node_ids=...`: exo's placements over cycles containing the
   planned nodes, every sharding and backend. Entries with no instance (exo's errors), Tensor
   ones and other backends are skipped. A Pipeline preview of the chosen backend over the
   planned nodes (or more) is rewritten to the plan's ranks; when there is none (exo's own
   RAM-proportional split of those nodes may fail its checks where the plan's does not), the
   instance is built from exo's state: the model card from any preview, the addresses from the
   topology, by exo's rules (`schema.build_instance`);
4. memory, before anything is posted (exo's `POST /instance` checks only that the model fits
   the cluster's TOTAL available RAM): exo's own per-node rule (every layer costs
   storage_size / n_layers, against the node's available RAM) AND the plan's measured model
   of current exo (embedding and head on every rank);
5. `POST /instance`, then follow `GET /instance/await` (a server-sent event stream) to the
   `ready` event of THIS instance, with exo's `timeout_seconds` sent and the whole wait bounded
   by `--wait`. `--dry-run` prints the instance JSON and posts nothing.

A plan whose single stage is an equal-share tensor group (graphsplit.hybrid) becomes exo's
Tensor instance instead (`place_tensor`): TensorShardMetadata ranks in the group's order, every
rank all layers, from exo's Tensor preview over the group or built from its state, after exo's
own Tensor rules (supportsTensor; hidden size and KV heads divisible by the group size), which
`POST /instance` does not check. A hybrid plan (a group inside a pipeline) or unequal shares
is refused in one line: current exo cannot run it; `exo-bridge run` does.

Every wait has a total bound: `--timeout` per request (connect to last byte), `--wait` for the
instance. Stdout carries only the instance JSON (dry run) or the result line; progress goes to
stderr. Every failure is one line (UserError), exit code 2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from exo_bridge.exo_current import schema
from exo_bridge.exo_current.http import Client, PeerError, PeerTimeout, parse_api_url
from exo_bridge.exo_current.schema import (CardView, ClusterState, ExoSchemaError, NodeInfo,
                                           Preview, Rank)
from exo_bridge.formats import read_node_map
from graphsplit.manual import apply_layers
from graphsplit.plan import Plan, read_plan
from profiler.errors import UserError

GIB = 1024 ** 3


# ---------------------------------------------------------------- talking to exo


class Exo:
    """exo's API: JSON answers, or one-line errors naming --api, the request and exo's words."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.label = client.endpoint.label

    def call(self, method: str, path: str, body: Any = None, ok_404: bool = False) -> Any:
        status, data = self.client.json(method, path, body)
        if ok_404 and status == 404:
            return None
        if status >= 400:
            raise UserError(f"{self.label}: exo refused {method} {path.split('?')[0]} (HTTP "
                            f"{status}): {schema.error_text(data)}")
        if status >= 300:
            raise PeerError(f"{self.label}: {method} {path.split('?')[0]} answered HTTP "
                            f"{status}, a redirect; give exo's API address itself")
        return data

    def parse(self, fn, data: Any, what: str) -> Any:
        """`fn(data)` on an answer of exo's; a shape or type it does not expect is one line
        naming --api and the request, never a traceback."""
        try:
            return fn(data)
        except ExoSchemaError as e:
            raise ExoSchemaError(f"{self.label}: {what}: {e}") from None
        except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
            raise ExoSchemaError(f"{self.label}: {what}: an answer with unexpected types "
                                 f"({type(e).__name__}: {e}); exo-bridge does not know this "
                                 "exo version") from None

    def cached_models(self) -> set[str] | None:
        """Model ids exo has cards for (`GET /models`), None if it cannot say."""
        try:
            status, data = self.client.json("GET", "/models")
        except PeerTimeout:
            return None
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("data"), list):
            return None
        return {str(m.get("id")) for m in data["data"] if isinstance(m, dict)}


def fetch_previews(exo: Exo, model: str, node_ids: list[str], log,
                   shards: tuple[str, ...] = schema.KNOWN_SHARDS) -> list[Preview]:
    """exo's previews over cycles containing `node_ids` (instances whose shards are of a kind
    in `shards`); a model exo cannot resolve is said so."""
    cached = exo.cached_models()
    if cached is not None and model not in cached:
        log(f"note: exo has no cached model card for {model}; exo fetches it from Hugging Face "
            "now (slow, and fails offline)")
    try:
        status, data = exo.client.json("GET", schema.previews_path(model, node_ids))
    except PeerTimeout as e:
        if cached is not None and model not in cached:
            raise UserError(f"{e}; exo was fetching the model card of {model} from Hugging Face "
                            "(it has not cached it): check the model id, exo's internet "
                            "access, or raise --timeout") from None
        raise
    if status == 400 and "model card" in schema.error_text(data).lower():
        raise UserError(f"exo cannot resolve model {model}: {schema.error_text(data)}; exo "
                        "looks up a model it has not cached on Hugging Face: check --model (a "
                        "Hugging Face repo id) and that exo's machines reach huggingface.co")
    if status >= 400:
        raise UserError(f"{exo.label}: exo refused GET /instance/previews (HTTP {status}): "
                        f"{schema.error_text(data)}")
    return exo.parse(lambda d: schema.parse_previews(d, shards), data,
                     "GET /instance/previews")


# ---------------------------------------------------------------- node mapping


def map_nodes(plan_nodes: list[str], exo_nodes: dict[str, NodeInfo],
              node_map: dict[str, str] | None) -> dict[str, str]:
    """plan node -> exo node id: the map file, else an exo id, else a unique friendly name."""
    node_map = node_map or {}
    by_name: dict[str, set[str]] = {}
    for nid, info in exo_nodes.items():
        if info.name:
            by_name.setdefault(info.name, set()).add(nid)
            by_name.setdefault(info.name.lower(), set()).add(nid)
    known = ", ".join(f"{i.name}={nid}" if i.name else nid for nid, i in sorted(exo_nodes.items()))
    out = {}
    for p in plan_nodes:
        named = by_name.get(p, by_name.get(p.lower(), set()))
        if p in node_map:
            nid = node_map[p]
            if nid not in exo_nodes:
                raise UserError(f"--node-map maps {p} to {nid}, which exo does not have "
                                f"(exo's nodes: {known or 'none reported'})")
        elif p in exo_nodes:
            nid = p
        elif len(named) == 1:
            nid = next(iter(named))
        elif len(named) > 1:
            raise UserError(f"plan node {p}: exo has several nodes named {p}; say which with "
                            "--node-map FILE ({\"plan node\": \"exo node id\"})")
        else:
            raise UserError(f"plan node {p}: exo has no node with this id or name (exo's nodes: "
                            f"{known or 'none reported'}); map it with --node-map FILE "
                            "({\"plan node\": \"exo node id\"})")
        out[p] = nid
    if len(set(out.values())) != len(out):
        raise UserError("two plan nodes map to the same exo node; fix --node-map")
    return out


# ---------------------------------------------------------------- memory


def exo_current_stage_memory(plan: Plan) -> tuple[dict[str, int] | None, str]:
    """Bytes each stage needs under current exo (embedding + head on every rank): the plan's
    prediction when it was made for exo-current, else re-predicted from its cluster file."""
    pred = (plan.predicted or {}).get("stage_memory_bytes") or {}
    if plan.runtime == "exo-current" and all(s.node in pred for s in plan.stages):
        return {s.node: int(pred[s.node]) for s in plan.stages}, "the plan"
    if plan.cluster_file and Path(plan.cluster_file).exists():
        try:
            from graphsplit.cluster import load_cluster
            from graphsplit.costmodel import Workload, predict

            cluster = load_cluster(plan.cluster_file)
            wl = plan.workload or {}
            workload = Workload(int(wl.get("prompt_tokens", 512)),
                                int(wl.get("context_tokens", 1024)), int(wl.get("streams", 1)))
            p = predict(cluster, plan.stages, workload, "exo-current").to_dict()
            mem = p.get("stage_memory_bytes") or {}
            if all(s.node in mem for s in plan.stages):
                return ({s.node: int(mem[s.node]) for s in plan.stages},
                        f"re-predicted from {plan.cluster_file} for exo-current")
        except (ImportError, UserError, OSError) as e:
            return None, f"cannot re-predict memory from {plan.cluster_file} ({e})"
    return None, (f"the plan was made for runtime {plan.runtime} and has no cluster file to "
                  "re-predict memory for current exo")


def check_exo_rule(plan: Plan, mapping: dict[str, str], exo_nodes: dict[str, NodeInfo],
                   card: CardView, log) -> None:
    """exo's own per-node rule, which its placement applies and `POST /instance` does not:
    storage_size * layers // n_layers must fit the node's available RAM."""
    unknown = []
    for s in plan.stages:
        nid, k = mapping[s.node], s.end_layer - s.start_layer
        have = (exo_nodes.get(nid) or NodeInfo(nid)).ram_available
        if have is None:
            unknown.append(s.node)
            continue
        need = schema.exo_layer_bytes(card, k)
        if need > have:
            raise UserError(f"{s.node} ({nid}) gets {k} of {card.n_layers} layers: exo's "
                            f"placement rule (every layer costs storage_size / n_layers = "
                            f"{card.storage_bytes / card.n_layers / GIB:.3f} GiB) needs "
                            f"{need / GIB:.2f} GiB but exo reports {have / GIB:.2f} GiB available "
                            "there; re-plan with fewer layers on it or free memory "
                            "(--skip-memory-check posts anyway)")
    if unknown:
        log(f"warning: exo reports no available RAM for {', '.join(unknown)}; exo's per-node "
            "rule not checked there")
    else:
        log("exo's per-node memory rule ok (storage_size / n_layers per layer, available RAM)")


def check_memory(plan: Plan, mapping: dict[str, str], exo_nodes: dict[str, NodeInfo],
                 log) -> None:
    """The plan's measured memory model of current exo against exo's available RAM."""
    need, source = exo_current_stage_memory(plan)
    if need is None:
        log(f"warning: measured memory not checked: {source}")
        return
    for s in plan.stages:
        nid = mapping[s.node]
        info = exo_nodes.get(nid)
        have, what = None, ""
        if info and info.ram_available is not None:
            have, what = info.ram_available, "available (exo's /state)"
        elif (plan.nodes.get(s.node) or {}).get("memory_bytes"):
            have, what = int(plan.nodes[s.node]["memory_bytes"]), "usable (the plan's profile)"
        if have is None:
            log(f"warning: memory of {s.node} unknown; not checked")
            continue
        if need[s.node] > have:
            raise UserError(f"{s.node} ({nid}) needs {need[s.node] / GIB:.2f} GiB for layers "
                            f"[{s.start_layer}, {s.end_layer}) under current exo (embedding and "
                            f"head on every rank; {source}) but has {have / GIB:.2f} GiB {what}; "
                            "re-plan for runtime exo-current or free memory "
                            "(--skip-memory-check posts anyway)")
    log(f"measured memory ok ({source})")


# ---------------------------------------------------------------- the instance


def make_instance(previews: list[Preview], cluster: ClusterState, ranks: list[Rank],
                  meta: str, model: str, n_layers: int, log) -> tuple[dict, CardView]:
    """A preview over the planned nodes rewritten to the plan, else an instance built from
    exo's state. Returns (instance, model card)."""
    tag, wanted = schema.META_TAGS[meta], {r.node_id for r in ranks}
    usable = [p.view for p in previews if p.view is not None and p.sharding == "Pipeline"
              and p.view.tag == tag and wanted <= set(p.view.node_ids)]
    skipped = len(previews) - len(usable)
    cards = [p.card for p in previews if p.card is not None]
    if not cards:
        errors = "; ".join(sorted({p.error for p in previews if p.error})) or "no previews"
        raise UserError(f"exo offered no placement of {model} over "
                        f"{', '.join(sorted(wanted))} at all ({errors}), so there is no model "
                        "card to build an instance from; check that exo sees these nodes and "
                        "that the model fits their available RAM")
    card = schema.parse_card(usable[0].model_card if usable else cards[0])
    if card.n_layers != n_layers:
        raise UserError(f"the plan splits {n_layers} layers but exo's model {model} has "
                        f"{card.n_layers}; re-plan for this model")
    if usable:
        view = min(usable, key=lambda v: (len(v.node_ids), sorted(v.node_ids)))
        log(f"exo's Pipeline preview over {', '.join(view.node_ids)} rewritten to the plan "
            f"({skipped} other previews skipped: other sharding, backend or nodes, or none)")
        return schema.rewrite_instance(view, ranks, n_layers, topo=cluster.topology), card
    if cluster.topology is None:
        raise UserError(f"no {meta} Pipeline preview of exo's covers "
                        f"{', '.join(sorted(wanted))} and exo's /state has no topology to build "
                        "one from; check that exo sees these nodes connected")
    log(f"no {meta} Pipeline preview of exo's covers {', '.join(sorted(wanted))} "
        f"({skipped} previews skipped); instance built from exo's state (model card from its "
        "previews, addresses from its topology)")
    port = random.SystemRandom().randint(49153, 65534)
    port += port >= 52415  # exo's ephemeral range, never its API port
    return schema.build_instance(tag, card, ranks, cluster.topology, port), card


def await_ready(exo: Exo, model: str, instance_id: str, wait_s: float, log) -> None:
    """Follow exo's event stream until THIS instance is in exo's state; `wait_s` bounds it all.
    exo's `ready` names the first instance of the model it finds; if that is another one (the
    model already had an instance), ask for ours by id until the deadline."""
    deadline = time.monotonic() + wait_s
    late = UserError(f"exo accepted instance {instance_id} but did not report it ready within "
                     f"{wait_s:g} s (--wait); check exo's logs and GET /state")
    while time.monotonic() < deadline:
        path = schema.await_path(model, deadline - time.monotonic())
        ended = True
        try:
            for kind, item in exo.client.events(path, deadline):
                if kind == "response":
                    if item.status >= 400:
                        body = item.body.decode("utf-8", "replace")
                        try:
                            body = json.loads(body)
                        except json.JSONDecodeError:
                            pass
                        raise UserError(f"{exo.label}: exo refused GET /instance/await (HTTP "
                                        f"{item.status}): {schema.error_text(body)}")
                    raise ExoSchemaError(f"{exo.label}: GET /instance/await answered "
                                         f"{item.content_type or 'no content type'}, not an "
                                         "event stream (text/event-stream); exo-bridge "
                                         "does not know this exo version")
                if kind != "data":
                    continue
                ev = exo.parse(schema.parse_event, item, "GET /instance/await")
                if ev.kind == "ready" and ev.instance_id == instance_id:
                    return
                if ev.kind == "ready":
                    log(f"note: exo reports another instance of {model} ({ev.instance_id}) "
                        "ready; waiting for ours by id")
                    return _poll_instance(exo, instance_id, deadline, late)
                ended = ev.kind != "timeout"
                break
        except TimeoutError:
            raise late from None
        if ended:
            raise PeerError(f"{exo.label}: GET /instance/await: the event stream ended without "
                            "a ready or timeout event")
    raise late


def _poll_instance(exo: Exo, instance_id: str, deadline: float, late: UserError) -> None:
    while time.monotonic() < deadline:
        if exo.call("GET", schema.instance_path(instance_id), ok_404=True) is not None:
            return
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    raise late


def place(plan: Plan, exo: Exo, model: str, node_map: dict[str, str] | None = None,
          instance_meta: str = "MlxRing", dry_run: bool = False,
          skip_memory_check: bool = False, wait_s: float = 120.0,
          log=lambda m: print(m, file=sys.stderr)) -> dict:
    """Place `plan` on exo; returns the instance JSON (posted and ready unless dry_run)."""
    if any(s.tensor is not None for s in plan.stages):
        return place_tensor(plan, exo, model, node_map, instance_meta, dry_run,
                            skip_memory_check, wait_s, log)
    state = exo.call("GET", "/state", ok_404=True)
    if state is None:
        log("note: exo has no /state; plan nodes are taken as exo node ids")
        cluster = ClusterState({s.node: NodeInfo(s.node) for s in plan.stages}, None, {})
    else:
        cluster = exo.parse(schema.parse_state, state, "GET /state")
    mapping = map_nodes([s.node for s in plan.stages], cluster.nodes, node_map)
    ranks = [Rank(mapping[s.node], s.start_layer, s.end_layer) for s in plan.stages]
    previews = fetch_previews(exo, model, sorted(mapping.values()), log)
    if not any(p.card for p in previews):  # the model card from any placement of exo's
        previews += fetch_previews(exo, model, [], lambda m: None)
    instance, card = exo.parse(lambda p: make_instance(p, cluster, ranks, instance_meta, model,
                                                       plan.n_layers, log),
                               previews, "GET /instance/previews")
    if not skip_memory_check:
        check_exo_rule(plan, mapping, cluster.nodes, card, log)
        check_memory(plan, mapping, cluster.nodes, log)
    log("measured split: " + ", ".join(f"{s.node}={mapping[s.node]}[{s.start_layer},"
                                        f"{s.end_layer})" for s in plan.stages))
    if dry_run:
        return instance
    if model in cluster.instance_models.values():
        log(f"note: exo already runs an instance of {model}; this one is added beside it")
    exo.call("POST", "/instance", schema.post_body(instance))
    (_, body), = instance.items()
    iid = str(schema.get(body, "instanceId", "instance"))
    log(f"posted instance {iid}; waiting for exo to report it ready (at most {wait_s:g} s)")
    await_ready(exo, model, iid, wait_s, log)
    return instance


# ---------------------------------------------------------------- a Tensor instance


def check_tensor_plan(plan: Plan) -> None:
    """What current exo can run of a plan with tensor stages, before anything is asked of
    exo: ONE stage, a group with equal shares (graphsplit.hybrid.shares); else one line that
    says why and that `exo-bridge run` runs it."""
    from graphsplit.hybrid.shares import check_runtime_can_run

    check_runtime_can_run(plan.stages, "exo-current", int(plan.model.get("n_kv_heads") or 0)
                          or sum(plan.stages[0].tensor.kv_heads), 0)


def tensor_memory(plan: Plan) -> tuple[dict[str, int] | None, str]:
    """Bytes each member needs under current exo (all layers at its share, embedding and head
    whole): the plan's prediction when made for exo-current, else re-predicted from its
    cluster file."""
    members = plan.stages[0].members
    pred = (plan.predicted or {}).get("stage_memory_bytes") or {}
    if plan.runtime == "exo-current" and all(m in pred for m in members):
        return {m: int(pred[m]) for m in members}, "the plan"
    if plan.cluster_file and Path(plan.cluster_file).exists():
        try:
            from graphsplit.cluster import load_cluster
            from graphsplit.costmodel import Workload, predict

            wl = plan.workload or {}
            mem = predict(load_cluster(plan.cluster_file), plan.stages, Workload(
                int(wl.get("prompt_tokens", 512)), int(wl.get("context_tokens", 1024)),
                int(wl.get("streams", 1))), "exo-current").stage_memory_bytes
            return ({m: int(mem[m]) for m in members},
                    f"re-predicted from {plan.cluster_file} for exo-current")
        except (ImportError, UserError, OSError, KeyError) as e:
            return None, f"cannot re-predict memory from {plan.cluster_file} ({e})"
    return None, f"the plan was made for runtime {plan.runtime} and has no cluster file"


def _check_tensor_memory(plan: Plan, mapping: dict[str, str], exo_nodes: dict[str, NodeInfo],
                         log) -> None:
    """exo's Tensor placement checks only the group's summed memory (as POST /instance): the
    measured per-member need against each node's available RAM is the bridge's job."""
    need, source = tensor_memory(plan)
    if need is None:
        log(f"warning: measured memory not checked: {source}")
        return
    for m, b in need.items():
        info = exo_nodes.get(mapping[m])
        if info is None or info.ram_available is None:
            log(f"warning: memory of {m} unknown; not checked")
        elif b > info.ram_available:
            raise UserError(f"{m} ({mapping[m]}) needs {b / GIB:.2f} GiB for its share of every "
                            f"layer under current exo ({source}) but has "
                            f"{info.ram_available / GIB:.2f} GiB available; re-plan or free "
                            "memory (--skip-memory-check posts anyway)")
    log(f"measured memory ok ({source})")


def make_tensor_instance(previews: list[Preview], cluster: ClusterState, ranks: list[Rank],
                         meta: str, model: str, n_layers: int, log) -> tuple[dict, CardView]:
    """exo's Tensor preview over the group rewritten to the plan's rank order, else a Tensor
    instance built from exo's state; every rank runs all layers (exo's tensor shards)."""
    tag, wanted = schema.META_TAGS[meta], {r.node_id for r in ranks}
    usable = [p.view for p in previews if p.view is not None and p.sharding == "Tensor"
              and p.view.tag == tag and wanted <= set(p.view.node_ids)
              and all(sh.tag == schema.TENSOR_SHARD for sh in p.view.shards)]
    cards = [p.card for p in previews if p.card is not None]
    if not cards:
        errors = "; ".join(sorted({p.error for p in previews if p.error})) or "no previews"
        raise UserError(f"exo offered no placement of {model} over {', '.join(sorted(wanted))} "
                        f"at all ({errors}), so there is no model card to build an instance "
                        "from; check that exo sees these nodes and that the model fits them")
    card = schema.parse_card(usable[0].model_card if usable else cards[0])
    if card.n_layers != n_layers:
        raise UserError(f"the plan has {n_layers} layers but exo's model {model} has "
                        f"{card.n_layers}; re-plan for this model")
    why = schema.tensor_cut_problem(card, len(ranks))
    if why:
        raise UserError(f"exo cannot run {model} as a Tensor instance over {len(ranks)} nodes "
                        f"(exo: \"{why}\"); split with --runtime mlx-pipeline and run it with "
                        "`exo-bridge run`, which cuts unequal shares")
    if usable:
        view = min(usable, key=lambda v: (len(v.node_ids), sorted(v.node_ids)))
        log(f"exo's Tensor preview over {', '.join(view.node_ids)} rewritten to the plan's "
            "rank order")
        return schema.rewrite_instance(view, ranks, n_layers, topo=cluster.topology), card
    if cluster.topology is None:
        raise UserError(f"no {meta} Tensor preview of exo's covers {', '.join(sorted(wanted))} "
                        "and exo's /state has no topology to build one from")
    log(f"no {meta} Tensor preview of exo's covers {', '.join(sorted(wanted))}; Tensor "
        "instance built from exo's state")
    port = random.SystemRandom().randint(49153, 65534)
    port += port >= 52415
    return schema.build_instance(tag, card, ranks, cluster.topology, port,
                                 shard_tag=schema.TENSOR_SHARD), card


def place_tensor(plan: Plan, exo: Exo, model: str, node_map: dict[str, str] | None = None,
                 instance_meta: str = "MlxRing", dry_run: bool = False,
                 skip_memory_check: bool = False, wait_s: float = 120.0,
                 log=lambda m: print(m, file=sys.stderr)) -> dict:
    """A plan whose single stage is an equal-share tensor group, as exo's Tensor instance:
    rank i = the group's i-th node, every rank [0, n_layers)."""
    check_tensor_plan(plan)
    state = exo.call("GET", "/state", ok_404=True)
    members = list(plan.stages[0].members)
    cluster = (exo.parse(schema.parse_state, state, "GET /state") if state is not None else
               ClusterState({m: NodeInfo(m) for m in members}, None, {}))
    mapping = map_nodes(members, cluster.nodes, node_map)
    ranks = [Rank(mapping[m], 0, plan.n_layers) for m in members]
    kinds = (schema.PIPELINE_SHARD, schema.TENSOR_SHARD)
    previews = fetch_previews(exo, model, sorted(mapping.values()), log, kinds)
    if not any(p.card for p in previews):  # the model card from any placement of exo's
        previews += fetch_previews(exo, model, [], lambda m: None, kinds)
    instance, _ = exo.parse(lambda p: make_tensor_instance(p, cluster, ranks, instance_meta,
                                                           model, plan.n_layers, log),
                            previews, "GET /instance/previews")
    if not skip_memory_check:
        _check_tensor_memory(plan, mapping, cluster.nodes, log)
    log("tensor group: " + ", ".join(f"rank {i} {m}={mapping[m]} ({k} KV heads)" for i, (m, k)
                                     in enumerate(zip(members, plan.stages[0].tensor.kv_heads))))
    if dry_run:
        return instance
    exo.call("POST", "/instance", schema.post_body(instance))
    (_, body), = instance.items()
    iid = str(schema.get(body, "instanceId", "instance"))
    log(f"posted Tensor instance {iid}; waiting for exo to report it ready (at most "
        f"{wait_s:g} s)")
    await_ready(exo, model, iid, wait_s, log)
    return instance


# ---------------------------------------------------------------- the command


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from profiler import options as o

    ap.add_argument("--plan", required=True, type=o.path("plan file"),
                    help="plan file from `split-model --out`")
    ap.add_argument("--api", default="http://127.0.0.1:52415", type=o.text("exo API URL"),
                    help="exo's API (default http://127.0.0.1:52415)")
    ap.add_argument("--model", type=o.text("exo model id"), help="exo model id (Hugging Face "
                    "repo id); default: the plan's model.repo_id")
    ap.add_argument("--node-map", type=o.path("node map file"),
                    help="JSON file {plan node: exo node id}")
    ap.add_argument("--layers", type=o.text("manual split"), metavar="SPEC",
                    help="replace the plan's stages by a manual split, e.g. studio:20,mini:12 "
                    "(graphsplit.manual.apply_layers)")
    ap.add_argument("--instance-meta", default="MlxRing", choices=["MlxRing", "MlxJaccl"],
                    help="exo's distributed backend (default MlxRing)")
    ap.add_argument("--dry-run", action="store_true", help="print the instance JSON; post "
                    "nothing")
    ap.add_argument("--skip-memory-check", action="store_true")
    ap.add_argument("--timeout", type=o.seconds(3600), default=10.0, help="seconds each API "
                    "request may take in all, connect to last byte (default 10)")
    ap.add_argument("--wait", type=o.seconds(86400), default=120.0, help="seconds to wait in "
                    "all for exo to report the instance ready (default 120)")


def run(args: argparse.Namespace) -> int:
    endpoint = parse_api_url(args.api)
    if not args.wait > 0:
        raise UserError(f"--wait {args.wait}: must be a positive number of seconds")
    plan = read_plan(args.plan)
    if args.layers:
        plan = apply_layers(plan, args.layers)
    model = args.model or (plan.model or {}).get("repo_id")
    if not model:
        raise UserError("--model is required (the plan has no model.repo_id): give exo's model "
                        "id, e.g. mlx-community/Meta-Llama-3.1-8B-Instruct-4bit")
    node_map = read_node_map(args.node_map) if args.node_map else None
    exo = Exo(Client(endpoint, args.timeout))
    instance = place(plan, exo, model, node_map, args.instance_meta, args.dry_run,
                     args.skip_memory_check, args.wait)
    if args.dry_run:
        print(json.dumps(instance, indent=2))
    else:
        (tag, body), = instance.items()
        print(f"placed {model} on exo as {tag} {body.get('instanceId', body.get('instance_id'))} "
              f"({sum(len(s.members) for s in plan.stages)} ranks), ready")
    return 0
