"""Human-readable rendering of a plan (what `split-model` prints without --json)."""

from __future__ import annotations

from graphsplit.plan import Plan


def _gib(x) -> str:
    return f"{x / 2**30:.2f}"


def _ms(x) -> str:
    return f"{x * 1e3:.2f}" if x is not None else "-"


def _ratio(base: float, ours: float, higher_is_better: bool) -> str:
    if not ours or not base:
        return "-"
    r = (ours / base) if higher_is_better else (base / ours)
    return f"{r:.2f}x"


def proven_text(sv: dict) -> str:
    """What a plan's solver entry proves, in words (graphsplit.result.LABELS); a plan written
    before the labels existed says only optimal or not, which this reports as such."""
    from graphsplit.result import BOUND, LABELS
    proven = sv.get("proven")
    if proven not in LABELS:
        return "proven optimal (scope not recorded)" if sv.get("optimal") else LABELS[BOUND]
    text = LABELS[proven]
    if proven == BOUND:
        lb, gap = sv.get("lower_bound"), sv.get("gap")
        text += (f", proven lower bound {lb:.6g} (objective units), gap {gap:.2%}"
                 if lb is not None and gap is not None else ", no lower bound proven")
    return f"{text} [{proven}]"


def _solver_lines(plan: Plan) -> list[str]:
    sv = plan.solver
    if sv.get("manual"):
        opt = (plan.baselines.get("optimal") or {}).get("solver") or {}
        best = (f"the optimum (row 'optimal') by solver {opt.get('name')}, {proven_text(opt)}"
                if opt else "no optimum: nothing fits")
        return [f"manual split --layers {sv.get('layers')} (execution order as written); {best}"]
    return [f"solver {sv.get('name')}: {proven_text(sv)}"
            f" ({sv.get('message')}), {sv.get('solve_s', 0):.3f} s"]


def serving_lines(plan: Plan) -> list[str]:
    """How the streams are served: pattern, micro-batch, replicas (derived, say so)."""
    sv, p = plan.serving, plan.predicted
    k = len(plan.replicas or []) or 1
    if sv["pattern"] == "batch-through":
        how = (f"one batch of {sv['micro_batch']} stream(s) crosses every stage in turn, no "
               f"overlap (runtime cap {sv.get('max_batch')})")
    else:
        how = (f"micro-batches of {sv['micro_batch']} stream(s), {p.get('micro_batches')} in "
               "the ring at once")
    return [f"serving: {sv['pattern']}: {how}; replicas {k}; predicted cycle "
            f"{_ms(p.get('cycle_s'))} ms, {p['throughput_tps']:.2f} tok/s",
            f"         ({sv.get('why', '')})"]


def replica_lines(plan: Plan) -> list[str]:
    """One table row per replica (its nodes, streams, micro-batch, predicted tok/s)."""
    if not plan.replicas:
        return []
    out = ["", f"{'replica':>7}  {'streams':>7} {'batch':>5} {'cycle ms':>9} {'tok/s':>8}  stages"]
    for j, r in enumerate(plan.replicas):
        q = r["predicted"]
        st = " ".join(f"{s['node']}[{s['start_layer']}:{s['end_layer']}]" for s in r["stages"])
        out.append(f"{j + 1:>7}  {r['streams']:>7} {q['decode_batch']:>5} "
                   f"{_ms(q['cycle_s']):>9} {q['throughput_tps']:>8.2f}  {st}")
    out.append(f"{'':>7}  (stage rows above: replica 1; tok/s of the plan = the sum)")
    return out


def render(plan: Plan) -> str:
    p = plan.predicted
    w = plan.workload
    est = {n for n, d in plan.nodes.items() if d.get("estimated")}
    lines = [
        f"split-model: {plan.model['name']} ({plan.n_layers} layers) on {len(plan.nodes)} node(s), "
        f"runtime {plan.runtime}, objective {plan.objective}",
        f"workload: prompt {w.get('prompt_tokens')} tokens, context {w.get('context_tokens')} "
        f"tokens, {w.get('streams')} stream(s)",
        "all times predicted from measured cost tables"
        + (" (* = node estimated from its chip's roofline, not measured)"
           if est else ""),
        "",
        f"{'stage':>5}  {'node':<16} {'layers':<10} {'n':>4} {'decode ms':>10} {'link ms':>8} "
        f"{'prefill ms':>11}  {'memory GiB used / usable':>25}",
    ]
    if plan.serving:
        lines[3:3] = serving_lines(plan)
    for i, s in enumerate(plan.stages):
        n = s.node
        name = "+".join(s.members) + ("*" if n in est else "")
        used, cap = p["stage_memory_bytes"][n], p["stage_capacity_bytes"][n]
        lines.append(
            f"{i + 1:>5}  {name:<16} {f'{s.start_layer}-{s.end_layer - 1}':<10} "
            f"{s.end_layer - s.start_layer:>4} {_ms(p['stage_compute_s'][n]):>10} "
            f"{_ms(p['stage_link_s'][n]):>8} {_ms(p['stage_prefill_s'][n]):>11}  "
            f"{_gib(used) + ' / ' + _gib(cap):>25}")
    lines += replica_lines(plan)
    manual = bool(plan.solver.get("manual"))
    ours = "manual" if manual else "ours"
    used = {m for s in plan.stages for m in s.members} | {s["node"] for r in plan.replicas or []
                                                           for s in r["stages"]}
    unused = [n for n in plan.nodes if n not in used]
    if unused:
        why = "not in --layers" if manual else "faster without them"
        lines.append(f"       unused: {', '.join(unused)} ({why})")
    if p.get("shortfalls"):
        sf = ", ".join(f"{n} by {_gib(v)} GiB" for n, v in p["shortfalls"].items())
        lines.append(f"       does not fit: {sf}")
    lines += [""] + _solver_lines(plan) + [""]
    W = max([12] + [len(n) for n in plan.baselines])  # the name column fits every row
    hdr = (f"{'plan':<{W}} {'stages':>6} {'tpot ms':>9} {'ttft ms':>9} {'tok/s':>8} {'fits':>5}"
           f"   {'tpot gain':>9} {'ttft gain':>9} {'tok/s gain':>10}")
    lines.append(hdr)

    def row(name, pred, n_st, error=None):
        if not pred:
            return f"{name:<{W}} {'-':>6} ({error or 'not applicable'})"
        return (f"{name:<{W}} {n_st:>6} {_ms(pred['tpot_s']):>9} {_ms(pred['ttft_s']):>9} "
                f"{pred['throughput_tps']:>8.2f} {'yes' if pred.get('fits') else 'NO':>5}"
                f"   {_ratio(pred['tpot_s'], p['tpot_s'], False):>9}"
                f" {_ratio(pred['ttft_s'], p['ttft_s'], False):>9}"
                f" {_ratio(pred['throughput_tps'], p['throughput_tps'], True):>10}")

    lines.append(row(ours, p, len(plan.stages)))
    for name, b in plan.baselines.items():
        lines.append(row(name, b.get("predicted"), len(b.get("stages", [])), b.get("error")))
        if name == "optimal" and b.get("stages"):
            from graphsplit.manual import format_layers
            from graphsplit.plan import stages_from_json

            lines.append(f"{'':<{W}} --layers {format_layers(stages_from_json(b['stages'], name))}")
        if b.get("predicted") and b["predicted"].get("shortfalls"):
            sf = ", ".join(f"{n} by {_gib(v)} GiB" for n, v in b["predicted"]["shortfalls"].items())
            lines.append(f"{'':<{W}} does not fit: {sf}")
    lines.append(f"(gain = how much better {ours} is than that row, below 1.00x worse; tpot = "
                 "time per output token of one stream, ttft = time to first token, tok/s for "
                 "the streams)")
    if p.get("pareto"):
        lines += ["", "Pareto frontier (latency vs throughput):",
                  f"{'tpot ms':>9} {'bottleneck ms':>14} {'tok/s':>8}  stages"]
        for q in p["pareto"]:
            st = " ".join(f"{s['node']}[{s['start_layer']}:{s['end_layer']}]" for s in q["stages"])
            lines.append(f"{_ms(q['tpot_s']):>9} {_ms(q['bottleneck_s']):>14} "
                         f"{q['throughput_tps']:>8.2f}  {st}")
    return "\n".join(lines)
