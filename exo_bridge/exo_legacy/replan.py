"""Re-planning for the legacy strategy, in the toolkit's own environment.

The strategy inside legacy exo's process (strategy.py, standard library only) calls `replan`
directly when the toolkit is importable there, or runs `python -m exo_bridge.exo_legacy.replan`
with the toolkit's Python: the request as JSON on stdin, the answer as one JSON line on stdout.

Request: `{"nodes": [[exo id, memory MB], ...], "tables": {host: CostTable | path} | [paths] |
null, "cluster_file": path | null, "node_map": {plan name: exo id}, "objective": ...,
"workload": {...}, "use_all_nodes": bool}`.
Answer: `{"n_layers": N, "stages": [[exo id, start, end], ...]}` or `{"error": "why not"}`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from profiler.errors import UserError

MB = 2 ** 20


def _load_tables(tables: Any) -> dict[str, Any]:
    """Cost tables keyed by host: `{node: CostTable | path}`, or paths/dirs of table files."""
    from profiler.costtable import CostTable, read_table

    if not tables:
        return {}
    if isinstance(tables, dict):
        return {str(k): (v if isinstance(v, CostTable) else read_table(v))
                for k, v in tables.items()}
    out: dict[str, Any] = {}
    for item in tables:
        p = Path(item)
        for f in (sorted(p.glob("*.json")) if p.is_dir() else [p]):
            t = read_table(f)
            out[t.device.host] = t
    return out


def _inputs(request: dict) -> tuple[dict, dict, Any]:
    """(tables by exo id, links by exo ids, default link) from the tables or the cluster file."""
    to_exo = lambda name: (request.get("node_map") or {}).get(name, name)  # noqa: E731
    tables = _load_tables(request.get("tables"))
    links, default_link = {}, None
    if not tables and request.get("cluster_file"):
        from graphsplit.cluster import load_cluster

        try:
            cluster = load_cluster(request["cluster_file"])
        except (UserError, OSError) as e:
            raise UserError(f"cannot read the plan's cluster file ({e})") from None
        tables = {n.id: n.table for n in cluster.nodes}
        links = {(to_exo(a), to_exo(b)): link for (a, b), link in cluster.links.items()}
        default_link = cluster.default_link
    return {to_exo(k): v for k, v in tables.items()}, links, default_link


def _usable_memory(nodes: list, tables: dict) -> dict[str, int]:
    """exo reports TOTAL memory (MB); the splitter fits into USABLE memory: the topology's total
    scaled by the table's measured usable/total ratio, never above the table's usable."""
    memory = {}
    for n, m in nodes:
        dev = tables[n].device
        if m > 0 and dev.memory_total_bytes > 0:
            ratio = dev.memory_usable_bytes / dev.memory_total_bytes
            memory[n] = int(min(dev.memory_usable_bytes, m * MB * ratio))
    return memory


def replan(request: dict) -> dict:
    """Plan for exactly the nodes of `request` (see the module docstring); never raises."""
    try:
        tables, links, default_link = _inputs(request)
    except UserError as e:
        return {"error": str(e)}
    nodes = [(str(n), int(m)) for n, m in request["nodes"]]
    present = [n for n, _ in nodes]
    if not tables:
        return {"error": "no cost tables to re-plan from"}
    lacking = [n for n in present if n not in tables]
    if lacking:
        return {"error": f"no cost table for {', '.join(lacking)}"}
    from graphsplit.api import make_plan
    from graphsplit.cluster import cluster_from_tables
    from graphsplit.costmodel import Workload

    wl = request.get("workload") or {}
    workload = Workload(int(wl.get("prompt_tokens", 512)), int(wl.get("context_tokens", 1024)),
                        int(wl.get("streams", 1)))
    try:
        links = {k: v for k, v in links.items() if k[0] in present and k[1] in present}
        memory = _usable_memory(nodes, tables)
        cluster = cluster_from_tables({n: tables[n] for n in present}, links=links or None,
                                      default_link=default_link, memory=memory or None)
        plan = make_plan(cluster, objective=request.get("objective") or "latency",
                         workload=workload, runtime="exo-legacy",
                         use_all_nodes=bool(request.get("use_all_nodes")))
    except UserError as e:
        return {"error": f"re-planning failed ({e})"}
    except Exception as e:  # the caller is exo's node: report, never raise
        return {"error": f"re-planning failed ({type(e).__name__}: {e})"}
    return {"n_layers": plan.n_layers,
            "stages": [[s.node, s.start_layer, s.end_layer] for s in plan.stages]}


def main() -> int:
    try:
        request = json.loads(sys.stdin.read())
        answer = replan(request)
    except Exception as e:  # noqa: BLE001 - one JSON line whatever happens
        answer = {"error": f"re-planning failed ({type(e).__name__}: {e})"}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
