"""What `split-model --hybrid` prints besides the usual plan table: each tensor group's members,
shares, per-member time and memory, its all-reduces, and what the solver proved."""

from __future__ import annotations

from graphsplit.plan import Plan


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def tensor_lines(plan: Plan) -> list[str]:
    p = plan.predicted
    lines = []
    for i, s in enumerate(plan.stages):
        if s.tensor is None:
            continue
        t = (p.get("tensor") or {}).get(s.node, {})
        derived = ", some interpolated between measured shares or sizes" if t.get("derived_shares") \
            else ""
        lines.append(f"stage {i + 1} is tensor-parallel over {'+'.join(s.tensor.nodes)} "
                     f"(chain order; shares {'/'.join(map(str, s.tensor.kv_heads))} KV heads, "
                     f"{'/'.join(map(str, s.tensor.mlp_columns))} MLP columns{derived}):")
        own = t.get("member_compute_s", {})
        for m, k in zip(s.tensor.nodes, s.tensor.kv_heads):
            used, cap = p["stage_memory_bytes"].get(m, 0), p["stage_capacity_bytes"].get(m, 0)
            lines.append(f"    {m:<16} {k:>3} KV heads  blocks {_ms(own.get(m, 0.0)):>9} ms  "
                         f"memory {used / 2**30:.2f} / {cap / 2**30:.2f} GiB")
        lines.append(f"    per token (decode): slowest member per block {_ms(t.get('blocks_s', 0))}"
                     f" ms + all-reduces {_ms(t.get('allreduce_s', 0))} ms (measured "
                     f"collective) + entry along the chain {_ms(t.get('entry_s', 0))} ms")
    sv = plan.solver
    if sv.get("proven"):
        lb, gap = sv.get("lower_bound"), sv.get("gap")
        lines.append(f"proven: {sv['proven']}"
                     + (f" (lower bound {_ms(lb)} ms-equivalent, gap {gap:.1%})"
                        if sv["proven"] == "bound" and lb is not None and gap is not None
                        else ""))
    return lines
