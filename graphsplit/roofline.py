"""Cost tables for chips nobody profiled: a roofline of the chip itself (an ESTIMATE).

Problem: a cluster may name a machine that was never profiled (``"chip": "M4 Pro 48GB"``). Its
cost table must be predicted from the chip's specs alone. Scaling another machine's measured
times by a bandwidth ratio carries that machine's inefficiency along (a Linux CPU table scaled
to an M2 Ultra gave 27 tokens/s for Llama-3-8B 4-bit, where mlx-lm users measure 110-120 on an
M3 Ultra of the same bandwidth). Here each row's time comes from what it moves and computes on
the new chip, at efficiencies measured on real Apple machines running MLX:

    t(row) = max(weight bytes / (bandwidth x E_gemv) + KV bytes read / (bandwidth x E_gemv x E_sdpa),
                 flops / (fp16 peak x COMPUTE_EFFICIENCY)) + overhead(row)

    decode, context c, B streams:  block  bytes = weights + B x KV/token x c
                                          flops = B x (2 x params + 4 x heads x head_dim x c)
                                   embed  bytes = B embedding rows;  head: its weights (a tied
                                          head reads the embedding matrix), 2 x params flops
    prefill of P tokens:           block  bytes = weights + P x KV/token
                                          flops = 2 x params x P + 2 x heads x head_dim x P^2
                                          (causal attention); embed: P rows; head: the last
                                          position only (as the profiler measures it)
    overhead: BLOCK_OVERHEAD_S per block per pass; none for embed and head

What is taken from the measured table: the model's shape and bytes only (weight bytes per row,
KV bytes per token, activation bytes, the quantization). Bytes are converted to what the chip
runs: a quantized model as an mlx-community checkpoint (bfloat16 scales, biases and
activations), whatever dtype the profiling machine used (the Linux CPU build profiles with
float32 scales). So two tables of the same model give the same chip times, whichever machine
measured them. Times are put on fixed grids (PREFILL_GRID, DECODE_GRID), wide enough that a
workload is rarely extrapolated.

Efficiencies (each from a published measurement; tests/test_whatif.py checks them):

* E_gemv, the share of the chip's bandwidth a quantized matrix-vector product streams weights
  at, by generation. M1 and M2: GEMV_BW_EFFICIENCY = 316 / 410, measured on an M1 Max (field
  notes; ggml-org/llama.cpp#1642 lists "attainable 317.6 GB/s, physical limit 409.6 GB/s" for
  its GPU; no M2 figure was found, so the M2 shares it). M3 and later:
  GEMV_BW_EFFICIENCY_M3 = 398 / 400, a 4-bit 5120 x 17408 GEMV (50.1 MB) in 0.126 ms with fresh
  weights each repeat on an M3 Max (ml-explore/mlx#3852, mlx 0.32.0). A chip given as numbers
  (no generation) gets the M1 figure, the lower one.
* E_sdpa = SDPA_BW_EFFICIENCY = 297.6 / 530: reading the KV cache (vector attention, 32 query
  and 8 KV heads of 128, 32k context) runs at 56% of the rate plain streaming reaches on the same
  machine (ml-explore/mlx#3837, M5 Max).
* BLOCK_OVERHEAD_S: fitted to Llama-3.1-8B 4-bit decoding at 115 tokens/s on an M3 Ultra
  (819 GB/s) at a 512-token context: mlx-lm users report 110-120 (Rapid-MLX#586 measured
  119.4 short / 110.5 long, mlx 0.31.2). The bandwidth term alone gives 188 tokens/s; the
  rest, about 0.1 ms per block, is kernel dispatch, the gaps between small kernels and the
  Ultra's two dies, which a roofline does not see.
* COMPUTE_EFFICIENCY: fitted to Llama-3.3-70B 4-bit prefilling 1171 tokens at 83.8 tokens/s
  on an M3 Max with the 40-core GPU (14.3 TFLOPS; ml-explore/mlx-examples#1029, mlx 0.21.1).

Checked without fitting (tests): Llama-3.3-70B 4-bit decode on that M3 Max, 9.35 tokens/s at
a 260-token prompt and 6.81 at 28k, and Mistral-7B 4-bit prefilling 33,898 tokens at 869
tokens/s on an M2 Ultra (ml-explore/mlx-lm#40). `python bench/bench_whatif.py` prints them
with the derived numbers.

Not modelled: mixture-of-experts models (every parameter counts as active), the Neural Engine,
thermal throttling, other processes on the machine.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

from profiler.costtable import CostTable, DeviceInfo, LayerRow

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CHIP_QUANT_DTYPE = "bfloat16"  # MLX on Metal: scales, biases and activations of a 4-bit model

GEMV_BW_EFFICIENCY = 316 / 410  # M1, M2: M1 Max quantized GEMV (field notes; llama.cpp#1642)
GEMV_BW_EFFICIENCY_M3 = 398 / 400  # M3 and later: M3 Max cold 4-bit GEMV (mlx#3852)
SDPA_BW_EFFICIENCY = 297.6 / 530  # KV reads vs streaming, vector SDPA 8 KV heads (mlx#3837)
BLOCK_OVERHEAD_S = 105e-6  # fitted: Llama-3.1-8B 4-bit, M3 Ultra, 115 tok/s (Rapid-MLX#586)
COMPUTE_EFFICIENCY = 0.81  # fitted: Llama-3.3-70B 4-bit prefill, M3 Max 40c (mlx-examples#1029)


def gemv_efficiency(generation: int | None) -> float:
    """E_gemv for an Apple chip generation (1 for M1, ...); None (unknown): the M1 figure."""
    return GEMV_BW_EFFICIENCY_M3 if generation is not None and generation >= 3 \
        else GEMV_BW_EFFICIENCY



@dataclass(frozen=True)
class Anchor:
    """A published measurement of mlx-lm on a real Apple machine."""

    model: str  # the built-in model of the same shape (profiler.models)
    chip: str  # graphsplit.chips name
    phase: str  # decode | prefill
    tokens: int  # decode: the mean KV context; prefill: the prompt length
    tok_s: float  # published tokens/s
    use: str  # which constant it fits, or "held out"
    source: str


ANCHORS = (
    Anchor("llama-3-8b", "M3 Ultra 256GB", "decode", 512, 115.0, "fits BLOCK_OVERHEAD_S",
           "Llama-3.1-8B 4-bit: 110-120 reported (field notes); Rapid-MLX#586 119.4 / 110.5"),
    Anchor("llama-3-70b", "M3 Max 64GB", "decode", 414, 9.351, "held out",
           "Llama-3.3-70B 4-bit, 260-token prompt + 309 generated (ml-explore/mlx-examples#1029)"),
    Anchor("llama-3-70b", "M3 Max 64GB", "decode", 28015, 6.808, "held out",
           "Llama-3.3-70B 4-bit, 28,002-token prompt + 27 generated (mlx-examples#1029)"),
    Anchor("llama-3-70b", "M3 Max 64GB", "prefill", 1171, 83.843, "fits COMPUTE_EFFICIENCY",
           "Llama-3.3-70B 4-bit, 1171-token prompt (mlx-examples#1029)"),
    Anchor("mistral-7b", "M2 Ultra 192GB", "prefill", 33898, 869.279, "held out",
           "Mistral-7B 4-bit, 33,898-token prompt (ml-explore/mlx-lm#40)"),
)

PREFILL_GRID = (1, 16, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
DECODE_GRID = (1, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass(frozen=True)
class Peak:
    """A chip's peaks: memory bandwidth (GB/s) and fp16 matmul throughput (TFLOPS)."""

    bandwidth_gbs: float
    tflops: float
    gemv_efficiency: float = GEMV_BW_EFFICIENCY

    def seconds(self, nbytes: float, flops: float, kv_bytes: float = 0.0) -> float:
        """max(memory time, compute time) at the measured efficiencies: `nbytes` streamed as
        weights are, `kv_bytes` read by attention."""
        rate = self.bandwidth_gbs * 1e9 * self.gemv_efficiency
        return max(nbytes / rate + kv_bytes / (rate * SDPA_BW_EFFICIENCY),
                   flops / (self.tflops * 1e12 * COMPUTE_EFFICIENCY))


@dataclass(frozen=True)
class RowWork:
    """What one row stores, reads and computes on the chip (bytes as the chip stores them)."""

    kind: str  # embed | block | head
    weight_bytes: float  # stored
    read_bytes: float  # weights one decode step reads (embed: one row; tied head: the matrix)
    params: float  # parameters applied per token (flops = 2 x params per token)
    kv_bytes_per_token: float
    attn_width: int  # query heads x head_dim (blocks)

    def decode_s(self, peak: Peak, context: float, batch: int = 1) -> float:
        if self.kind == "embed":
            return peak.seconds(batch * self.read_bytes, 0.0)
        if self.kind == "head":
            return peak.seconds(self.read_bytes, batch * 2 * self.params)
        flops = batch * (2 * self.params + 4 * self.attn_width * context)
        kv = batch * self.kv_bytes_per_token * context
        return peak.seconds(self.read_bytes, flops, kv) + BLOCK_OVERHEAD_S

    def prefill_s(self, peak: Peak, tokens: float) -> float:
        if self.kind == "embed":
            return peak.seconds(tokens * self.read_bytes, 0.0)
        if self.kind == "head":  # the head runs on the last position only
            return self.decode_s(peak, 0)
        nbytes = self.read_bytes + tokens * self.kv_bytes_per_token
        flops = 2 * self.params * tokens + 2 * self.attn_width * tokens * tokens
        return peak.seconds(nbytes, flops) + BLOCK_OVERHEAD_S


def _bytes_per_param(quant: dict | None, dtype: str) -> float | None:
    """Stored bytes per parameter: bits/8 + a scale and a bias per group (affine quantization),
    or the dtype's size; None for a layout this does not know (kept as measured)."""
    if quant:
        if quant.get("mode", "affine") != "affine" or dtype not in DTYPE_BYTES:
            return None
        return quant["bits"] / 8 + 2 * DTYPE_BYTES[dtype] / quant["group_size"]
    return DTYPE_BYTES.get(dtype)


def chip_dtype(table: CostTable) -> str:
    """The dtype the chip runs the model in: bfloat16 for a quantized model (MLX on Metal, an
    mlx-community checkpoint), else the profiled dtype."""
    return CHIP_QUANT_DTYPE if table.quantization else table.dtype


def row_work(table: CostTable) -> dict[str, RowWork]:
    """Every row's work on a chip, from the table's shape and bytes (not its times)."""
    q = table.quantization
    base_bpp = _bytes_per_param(q, table.dtype) or (q["bits"] / 8 if q else 2.0)
    cdt = chip_dtype(table)
    chip_bpp = _bytes_per_param(q, cdt) or base_bpp
    act = DTYPE_BYTES.get(cdt, 2) / DTYPE_BYTES.get(table.dtype, 2)
    m = table.model
    attn = (m.num_attention_heads * m.head_dim) or m.hidden_size
    embed_params = table.embed.weight_bytes / base_bpp
    out = {}
    for r in table.rows:
        params = r.weight_bytes / base_bpp
        stored = params * chip_bpp
        read, used = stored, params
        if r.kind == "embed":
            read, used = m.hidden_size * chip_bpp, 0.0  # one row of the matrix per token
        elif r.kind == "head" and m.tie_word_embeddings:
            read, used = stored + embed_params * chip_bpp, params + embed_params
        out[r.name] = RowWork(r.kind, stored, read, used, r.kv_bytes_per_token * act,
                              attn if r.kind == "block" else 0)
    return out


def grid_times(w: RowWork, peak: Peak) -> dict[str, list[float]]:
    """A row's derived times on the chip's grids (PREFILL_GRID, DECODE_GRID), spreads 0:
    nothing was measured."""
    return {"prefill_s": [w.prefill_s(peak, p) for p in PREFILL_GRID],
            "prefill_spread": [0.0] * len(PREFILL_GRID),
            "decode_s": [w.decode_s(peak, c) for c in DECODE_GRID],
            "decode_spread": [0.0] * len(DECODE_GRID)}


def derive(base: CostTable, bandwidth_gbs: float, tflops: float, memory_bytes: int,
           usable_bytes: int, host: str, chip_name: str,
           generation: int | None = None) -> CostTable:
    """The cost table of a chip that was not profiled, from `base`'s model shape and bytes and
    the chip's peaks and generation (see the module docstring). Every row is marked estimated
    in `method["estimated"]`; spreads are 0 (nothing was measured)."""
    peak = Peak(float(bandwidth_gbs), float(tflops), gemv_efficiency(generation))
    work = row_work(base)
    act = DTYPE_BYTES.get(chip_dtype(base), 2) / DTYPE_BYTES.get(base.dtype, 2)
    rows = []
    for r in base.rows:
        w = work[r.name]
        row = copy.deepcopy(r)
        row.weight_bytes = int(round(w.weight_bytes))
        row.kv_bytes_per_token = int(round(w.kv_bytes_per_token))
        row.activation_bytes_per_token = int(round(r.activation_bytes_per_token * act))
        row.peak_memory_bytes = row.weight_bytes + int(
            max(0, r.peak_memory_bytes - r.weight_bytes) * act)
        for k, v in grid_times(w, peak).items():
            setattr(row, k, v)
        row.measured_from = r.name
        rows.append(row)
    t = dataclasses.replace(
        copy.deepcopy(base), dtype=chip_dtype(base), rows=rows,
        prefill_tokens=list(PREFILL_GRID), decode_context=list(DECODE_GRID),
        device=DeviceInfo(host=host, name=f"{chip_name} (estimated: roofline of its specs)",
                          backend="metal", mlx_version="", platform="estimated",
                          memory_total_bytes=int(memory_bytes),
                          memory_usable_bytes=int(usable_bytes),
                          memory_bandwidth_gbs=peak.bandwidth_gbs, matmul_tflops=peak.tflops),
        method={"estimated": "roofline of the chip's specs (graphsplit.roofline); nothing "
                             "measured on this chip",
                "shape_from": base.device.host, "chip": chip_name,
                "gemv_bw_efficiency": peak.gemv_efficiency,
                "sdpa_bw_efficiency": SDPA_BW_EFFICIENCY,
                "compute_efficiency": COMPUTE_EFFICIENCY,
                "block_overhead_s": BLOCK_OVERHEAD_S})
    _fill_later_fields(t, base, work, peak)
    return t


def _fill_later_fields(t: CostTable, base: CostTable, work: dict[str, RowWork],
                       peak: Peak) -> None:
    """Fields later table versions add, so no measured time of the base survives: the decode
    batch grid (rows' `decode_batch_s`) and the tensor-parallel section are derived; any other
    measured per-row list is reset to its default."""
    known = {"prefill_s", "prefill_spread", "decode_s", "decode_spread"}
    batches = getattr(base, "decode_batch", None)
    for row in t.rows:
        for f in dataclasses.fields(LayerRow):
            if f.name in known or not f.name.endswith(("_s", "_spread")):
                continue
            if f.name == "decode_batch_s" and batches:
                w = work[row.name]
                setattr(row, f.name, [[w.decode_s(peak, c, b) for b in batches]
                                      for c in DECODE_GRID])
            elif f.name == "decode_batch_spread" and batches:
                setattr(row, f.name, [[0.0] * len(batches) for _ in DECODE_GRID])
            else:
                setattr(row, f.name, _default(f))
    for f in dataclasses.fields(CostTable):
        if f.name == "tensor_parallel":
            setattr(t, f.name, _tensor_section(base, work, peak) or _default(f))


def _tensor_section(base: CostTable, work: dict[str, RowWork], peak: Peak) -> dict | None:
    """The base's tensor-parallel section (INTERFACES I2) re-derived on the chip: a rank with k
    of n KV heads holds k/n of the block's weights, KV and attention width (and k/n of the MLP
    columns), so its work is the block's scaled by k/n; the per-block overhead stays whole.
    Times on the chip's own grids; nothing of the base's times survives."""
    sec = getattr(base, "tensor_parallel", None)
    if not isinstance(sec, dict) or not sec.get("rows"):
        return None
    n = int(sec["n_kv_heads"])
    act = DTYPE_BYTES.get(chip_dtype(base), 2) / DTYPE_BYTES.get(base.dtype, 2)
    rows = []
    for r in sec["rows"]:
        f = int(r["kv_heads"]) / n
        w = work[r["measured_from"]]
        ws = dataclasses.replace(w, weight_bytes=w.weight_bytes * f, read_bytes=w.read_bytes * f,
                                 params=w.params * f, kv_bytes_per_token=w.kv_bytes_per_token * f,
                                 attn_width=int(round(w.attn_width * f)))
        rows.append(dict(r, weight_bytes=int(round(ws.weight_bytes)),
                         kv_bytes_per_token=int(round(ws.kv_bytes_per_token)),
                         **grid_times(ws, peak)))
    return dict(copy.deepcopy(sec), rows=rows,
                allreduce_bytes_per_token=sec["allreduce_bytes_per_token"] * act)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return copy.deepcopy(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def tokens_per_s(table: CostTable, phase: str, tokens: int) -> float:
    """One stream on one machine, from the table's rows (interpolated as the splitter does):
    decode: 1 / (embed + blocks + head) at context `tokens`; prefill: tokens / the same sum."""
    if phase == "decode":
        total = sum(table.decode_time(r, tokens) for r in table.rows)
        return 1.0 / total if total > 0 else math.inf
    total = sum(table.prefill_time(r, tokens) for r in table.rows)
    return tokens / total if total > 0 else math.inf
