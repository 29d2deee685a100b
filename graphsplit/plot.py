"""`--plot FILE.png`: per-layer measured cost by node, and one decode token's timeline."""

from __future__ import annotations

from graphsplit.costmodel import Workload, predict
from graphsplit.plan import Stage


def plot_plan(cluster, plan, workload: Workload, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from profiler.files import check_output

    check_output(path, f"--plot {path}")  # a FIFO, a directory or a missing parent: at once
    L = cluster.n_layers
    C = workload.context_tokens
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7.5),
                                   gridspec_kw={"height_ratios": [3, 2]})
    colors = {n.id: plt.cm.tab10(i % 10) for i, n in enumerate(cluster.nodes)}
    owner = {}
    for s in plan.stages:
        for i in range(s.start_layer, s.end_layer):
            owner[i] = s.node
    for n in cluster.nodes:
        t = n.table
        ys = [t.decode_time(t.row(f"layers.{i}"), C) * 1e3 for i in range(L)]
        label = n.id + (" (estimated)" if n.estimated else "")
        ax1.plot(range(L), ys, color=colors[n.id], lw=1, alpha=0.5,
                 ls="--" if n.estimated else "-", label=label)
        mine = [i for i in range(L) if owner.get(i) == n.id]
        if mine:
            ax1.plot(mine, [ys[i] for i in mine], "o", color=colors[n.id], ms=4)
    for s in plan.stages[1:]:
        ax1.axvline(s.start_layer - 0.5, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("transformer block")
    ax1.set_ylabel(f"decode ms / token (context {C})")
    ax1.set_title(f"{plan.model['name']}: measured per-block decode time by node "
                  f"(dots = blocks our {plan.objective} plan gives that node)")
    ax1.legend(fontsize=8, ncol=min(4, len(cluster.nodes)))
    lo_hi = [t for n in cluster.nodes for t in
             (n.table.decode_time(n.table.row(f"layers.{i}"), C) for i in (0, L - 1)) if t > 0]
    if lo_hi and max(lo_hi) / min(lo_hi) > 20:
        ax1.set_yscale("log")  # nodes orders of magnitude apart
    else:
        ax1.set_ylim(bottom=0)

    rows = [("ours", plan.stages)]
    for name, b in plan.baselines.items():
        if b.get("stages"):
            rows.append((name, [Stage(**s) for s in b["stages"]]))
    for y, (name, stages) in enumerate(rows):
        pr = predict(cluster, stages, workload, plan.runtime)
        t0 = 0.0
        for s in stages:
            c = pr.stage_compute_s[s.node] * 1e3
            lk = pr.stage_link_s[s.node] * 1e3
            ax2.barh(y, c, left=t0, color=colors[s.node], edgecolor="black", lw=0.5)
            if c > 0.06 * pr.tpot_s * 1e3:
                ax2.text(t0 + c / 2, y, f"{s.node}\n{s.start_layer}-{s.end_layer - 1}",
                         ha="center", va="center", fontsize=7)
            ax2.barh(y, lk, left=t0 + c, color="white", edgecolor="black", hatch="///", lw=0.5)
            t0 += c + lk
        flag = "" if pr.fits else "  (does not fit)"
        ax2.text(t0, y, f" {t0:.1f} ms, {pr.throughput_tps:.1f} tok/s{flag}", va="center",
                 fontsize=8)
    ax2.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax2.invert_yaxis()
    ax2.set_xlabel("ms: one decode token around the ring (hatched = link transfer)")
    ax2.set_title(f"time per output token and tok/s for {workload.streams} stream(s), "
                  "predicted from measured cost tables")
    xmax = ax2.get_xlim()[1]
    ax2.set_xlim(0, xmax * 1.25)
    fig.tight_layout()
    import io

    from profiler.files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format=_format(fig, path))
    atomic_write_bytes(path, buf.getvalue(), what=f"--plot {path}")
    plt.close(fig)
    return path


def check_plot_path(path: str) -> None:
    """Refuse a --plot file whose suffix matplotlib cannot write, before anything is computed
    or written (one line, UserError)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    _format(Figure(), path)


def _format(fig, path: str) -> str:
    """The image format from the file name (matplotlib's rule), png when it has none."""
    from pathlib import Path

    from profiler.errors import UserError

    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    if suffix not in fig.canvas.get_supported_filetypes():
        raise UserError(f"--plot {path}: .{suffix} is not an image format matplotlib writes; "
                        "use .png, .svg or .pdf")
    return suffix
