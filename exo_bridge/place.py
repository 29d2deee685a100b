"""`exo-bridge place`: run a measured plan on current exo through its HTTP API.

    exo-bridge place --plan PLAN.json --api http://HOST:52415 --model MODEL_ID [--dry-run]

1. `GET /instance/placement` (exo's own placement of the model: it carries the hosts, the model
   card and the instance type exo would use);
2. map the plan's nodes to exo node ids: `--node-map FILE` (JSON `{plan node: exo node id}`),
   else a plan node that IS an exo node id, else exo's friendly name (from `GET /state`);
3. rewrite the ranks to the plan's order and layer ranges, fresh ids (`exo_bridge.exo_api`);
4. check each rank's memory against the plan's model of the current exo runtime (embedding and
   head on every rank) and exo's reported available RAM;
5. `POST /instance`, then `GET /instance/await`. `--dry-run` prints the instance JSON and posts
   nothing.

Stdout carries only the instance JSON (dry run) or the result line; progress goes to stderr.
Every failure is one line (UserError): unreachable API, a shape we do not know, a node exo lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exo_bridge import exo_api
from exo_bridge.exo_api import ExoSchemaError, InstanceView, NodeInfo, Rank
from graphsplit.manual import apply_layers
from graphsplit.plan import Plan, read_plan
from profiler.errors import UserError, read_json

GIB = 1024 ** 3


class UnreachableError(UserError):
    """exo's API did not answer at all (connection refused, timeout, bad host)."""


# ---------------------------------------------------------------- HTTP (stdlib only)


@dataclass
class Api:
    base: str
    timeout: float = 10.0

    def __post_init__(self) -> None:
        self.base = self.base.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise UserError(f"--api {self.base!r}: give a URL such as http://HOST:52415")

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None,
                allow_404: bool = False) -> Any:
        url = self.base + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if allow_404 and e.code == 404:
                return None
            detail = _detail(e.read())
            raise UserError(f"exo's API refused {method} {path.split('?')[0]} (HTTP {e.code}): "
                            f"{detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UnreachableError(f"cannot reach exo's API at {self.base} ({reason}); is exo "
                                   "running there? check --api HOST:PORT (exo's default port "
                                   "is 52415)") from None
        try:
            return json.loads(raw or b"null")
        except json.JSONDecodeError:
            raise ExoSchemaError(f"exo's API at {self.base} answered {path.split('?')[0]} with "
                                 "something that is not JSON; is --api pointing at exo?") from None

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any, **kw) -> Any:
        return self.request("POST", path, body, **kw)


def _detail(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw.decode(errors="replace").strip().splitlines()[0][:300] if raw else "no detail"
    if isinstance(obj, dict):
        for k in ("detail", "error", "message"):
            if k in obj:
                v = obj[k]
                return v if isinstance(v, str) else json.dumps(v)[:300]
    return json.dumps(obj)[:300]


# ---------------------------------------------------------------- node mapping


def read_node_map(path: str | Path) -> dict[str, str]:
    p = Path(path)
    data = read_json(p, f"--node-map {p}", missing='write JSON {"plan node": "exo node id"}')
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise UserError(f"--node-map {p}: must be a JSON object {{\"plan node\": \"exo node "
                        "id\"}}")
    return data


def map_nodes(plan_nodes: list[str], exo_nodes: dict[str, NodeInfo],
              node_map: dict[str, str] | None, complete: bool = True) -> dict[str, str]:
    """plan node -> exo node id: the map file, else an exo id, else a unique friendly name.
    `complete`: exo_nodes lists every node exo has (from /state), so a mapped id can be checked."""
    node_map = node_map or {}
    by_name: dict[str, list[str]] = {}
    for nid, info in exo_nodes.items():
        if info.name:
            by_name.setdefault(info.name, []).append(nid)
            by_name.setdefault(info.name.lower(), []).append(nid)
    known = ", ".join(f"{i.name}={nid}" if i.name else nid for nid, i in sorted(exo_nodes.items()))
    out = {}
    for p in plan_nodes:
        if p in node_map:
            nid = node_map[p]
            if complete and exo_nodes and nid not in exo_nodes:
                raise UserError(f"--node-map maps {p} to {nid}, which exo does not have "
                                f"(exo's nodes: {known})")
        elif p in exo_nodes:
            nid = p
        elif len(set(by_name.get(p, by_name.get(p.lower(), [])))) == 1:
            nid = by_name.get(p, by_name.get(p.lower()))[0]
        elif len(set(by_name.get(p, by_name.get(p.lower(), [])))) > 1:
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


def check_memory(plan: Plan, mapping: dict[str, str], exo_nodes: dict[str, NodeInfo],
                 log) -> None:
    need, source = exo_current_stage_memory(plan)
    if need is None:
        log(f"warning: memory not checked: {source}")
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
    log(f"memory ok ({source})")


# ---------------------------------------------------------------- the command


def choose_placement(api: Api, model: str, meta: str, min_nodes: int,
                     wanted: set[str], log) -> InstanceView:
    """exo's placement if it includes every planned node, else a preview that does."""
    view = exo_api.parse_instance(api.get(exo_api.placement_path(model, "Pipeline", meta,
                                                                 min_nodes)))
    if wanted <= set(view.node_ids):
        return view
    try:
        previews = exo_api.parse_previews(api.get(exo_api.previews_path(model)))
    except UserError as e:
        log(f"note: previews unavailable ({e})")
        return view
    fits = [v for v in previews if v.tag == view.tag and wanted <= set(v.node_ids)]
    if fits:
        best = min(fits, key=lambda v: (len(v.node_ids), v.node_ids))
        log(f"exo's placement uses {', '.join(view.node_ids)}; using its preview over "
            f"{', '.join(best.node_ids)} which includes every planned node")
        return best
    return view


def place(plan: Plan, api: Api, model: str, node_map: dict[str, str] | None = None,
          instance_meta: str = "MlxRing", min_nodes: int | None = None, dry_run: bool = False,
          skip_memory_check: bool = False, wait_s: float = 60.0,
          log=lambda m: print(m, file=sys.stderr)) -> dict:
    """Place `plan` on exo; returns the instance JSON (posted unless dry_run)."""
    plan_nodes = [s.node for s in plan.stages]
    want = min_nodes or len(plan_nodes)
    complete = True
    try:
        exo_nodes = exo_api.parse_state_nodes(api.get("/state"))
    except (UnreachableError, ExoSchemaError):
        raise
    except UserError as e:  # an exo without /state: names unknown, ids only
        log(f"note: /state unavailable ({e}); matching plan nodes by exo node id only")
        exo_nodes = {}
    if not exo_nodes:  # the nodes of exo's placement (and previews) are all we know
        complete = False
        ids = set(exo_api.parse_instance(api.get(exo_api.placement_path(
            model, "Pipeline", instance_meta, want))).node_ids)
        try:
            for v in exo_api.parse_previews(api.get(exo_api.previews_path(model))):
                ids |= set(v.node_ids)
        except (UnreachableError, ExoSchemaError):
            raise
        except UserError:
            pass
        exo_nodes = {n: NodeInfo(n) for n in sorted(ids)}
    mapping = map_nodes(plan_nodes, exo_nodes, node_map, complete)
    view = choose_placement(api, model, instance_meta, want, set(mapping.values()), log)
    if not skip_memory_check:
        check_memory(plan, mapping, exo_nodes, log)
    ranks = [Rank(mapping[s.node], s.start_layer, s.end_layer) for s in plan.stages]
    instance = exo_api.rewrite_instance(view, ranks, plan.n_layers)
    dropped = sorted(set(view.node_ids) - set(mapping.values()))
    log(f"exo's placement: " + ", ".join(f"{n}[{a},{b})" for _, n, a, b in
                                          exo_api.instance_summary(view)))
    log("measured split:  " + ", ".join(f"{s.node}={mapping[s.node]}[{s.start_layer},"
                                         f"{s.end_layer})" for s in plan.stages)
        + (f"; not used: {', '.join(dropped)}" if dropped else ""))
    if dry_run:
        return instance
    api.post("/instance", exo_api.post_body(instance))
    ready = api.get(exo_api.await_path(model), timeout=wait_s, allow_404=True)
    if ready is None:
        raise UserError(f"exo accepted the instance but did not report it ready within "
                        f"{wait_s:.0f} s; check exo's logs and `GET /state`")
    return instance


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--plan", required=True, help="plan file from `split-model --out`")
    ap.add_argument("--api", default="http://127.0.0.1:52415", help="exo's API (default "
                    "http://127.0.0.1:52415)")
    ap.add_argument("--model", help="exo model id (Hugging Face repo id); default: the plan's "
                    "model.repo_id")
    ap.add_argument("--node-map", help="JSON file {plan node: exo node id}")
    ap.add_argument("--layers", metavar="SPEC", help="replace the plan's stages by a manual "
                    "split, e.g. studio:20,mini:12 (graphsplit.manual.apply_layers)")
    ap.add_argument("--instance-meta", default="MlxRing", choices=["MlxRing", "MlxJaccl"],
                    help="exo's distributed backend (default MlxRing)")
    ap.add_argument("--min-nodes", type=int, help="ask exo for a placement over at least this "
                    "many nodes (default: the plan's stage count)")
    ap.add_argument("--dry-run", action="store_true", help="print the instance JSON; post "
                    "nothing")
    ap.add_argument("--skip-memory-check", action="store_true")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per API call")
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the "
                    "instance to be ready")


def run(args: argparse.Namespace) -> int:
    plan = read_plan(args.plan)
    if args.layers:
        plan = apply_layers(plan, args.layers)
    model = args.model or (plan.model or {}).get("repo_id")
    if not model:
        raise UserError("--model is required (the plan has no model.repo_id): give exo's model "
                        "id, e.g. mlx-community/Meta-Llama-3.1-8B-Instruct-4bit")
    node_map = read_node_map(args.node_map) if args.node_map else None
    api = Api(args.api, args.timeout)
    instance = place(plan, api, model, node_map, args.instance_meta, args.min_nodes,
                     args.dry_run, args.skip_memory_check, args.wait)
    if args.dry_run:
        print(json.dumps(instance, indent=2))
    else:
        (tag, body), = instance.items()
        print(f"placed {model} on exo as {tag} {body.get('instanceId', body.get('instance_id'))} "
              f"({len(plan.stages)} ranks)")
    return 0
