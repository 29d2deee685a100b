"""Derived chip nodes against published mlx-lm figures, and what the known chips would do.

    python bench/bench_whatif.py

Table 1: every anchor of graphsplit.roofline (a published mlx-lm measurement on a real Apple
machine) beside what the roofline derives for that chip and model, with the relative error and
whether the anchor fits a constant or is held out. Table 2: derived single-machine decode and
prefill speed of Llama-3-8B and Llama-3-70B 4-bit on known chips (graphsplit.chips), and
whether the weights fit Metal's default working set. Every derived number uses the model's
real byte counts (built lazily with MLX by tests/shapes.py; nothing is allocated) and no
measured time. Prints tables; asserts nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphsplit import chips, roofline  # noqa: E402
from graphsplit.cluster import derive_table  # noqa: E402
from shapes import shaped_table  # noqa: E402

CHIPS = ("M4 16GB", "M4 Pro 48GB", "M4 Pro 64GB", "M4 Max 36GB", "M4 Max 128GB", "M1 Max 64GB",
         "M2 Ultra 192GB", "M3 Max 128GB", "M3 Ultra 512GB")


def chip_table(model: str, chip: str):
    s = chips.lookup(chip)
    return derive_table(shaped_table(model), s.bandwidth_gbs, s.fp16_tflops, s.memory_bytes,
                        host=s.slug, chip_name=s.name, generation=s.chip.generation)


def anchors() -> None:
    print("published mlx-lm figures vs the derived chip (tokens/s)")
    print(f"{'model':<12} {'chip':<15} {'phase':<8} {'tokens':>7} {'published':>10} "
          f"{'derived':>8} {'error':>7}  use")
    for a in roofline.ANCHORS:
        got = roofline.tokens_per_s(chip_table(a.model, a.chip), a.phase, a.tokens)
        print(f"{a.model:<12} {a.chip:<15} {a.phase:<8} {a.tokens:>7} {a.tok_s:>10.2f} "
              f"{got:>8.2f} {(got - a.tok_s) / a.tok_s:>+7.1%}  {a.use}: {a.source}")


def known_chips() -> None:
    print("\nderived, one machine, 4-bit: decode tokens/s at 1024 context, prefill tokens/s of "
          "a 512-token prompt; fits = weights + 1024 tokens of KV within Metal's working set")
    print(f"{'chip':<15} {'GB/s':>5} {'TFLOPS':>6}  {'8B decode':>9} {'8B prefill':>10} "
          f"{'fits':>4}  {'70B decode':>10} {'70B prefill':>11} {'fits':>4}")
    for chip in CHIPS:
        s = chips.lookup(chip)
        cells = []
        for model in ("llama-3-8b", "llama-3-70b"):
            t = chip_table(model, chip)
            need = sum(r.weight_bytes + 1024 * r.kv_bytes_per_token for r in t.rows)
            fits = "yes" if need <= t.device.memory_usable_bytes else "no"
            cells.append(f"{roofline.tokens_per_s(t, 'decode', 1024):>9.1f} "
                         f"{roofline.tokens_per_s(t, 'prefill', 512):>10.0f} {fits:>4}")
        print(f"{chip:<15} {s.bandwidth_gbs:>5g} {s.fp16_tflops:>6.1f}  {cells[0]}   {cells[1]}")


if __name__ == "__main__":
    anchors()
    known_chips()
