"""Cost tables with a real model's bytes (MLX, lazily: nothing is allocated) for roofline checks.

`shaped_table("llama-3-8b", dtype="bfloat16", bits=4)` builds the built-in model's mlx-lm
skeleton with lazy parameters, casts and quantizes each part as the profiler does
(profiler.build: `cast_floating`, `nn.quantize` structure) and reads the bytes of its arrays
(`param_bytes` works on lazy arrays). So weight bytes are what `profile-model` records for that
model and dtype: float32 scales and biases on the Linux CPU build, bfloat16 on Metal. Times are
a stand-in machine's (`speed`): the roofline derivation must not read them.
"""

from __future__ import annotations

from functools import lru_cache

from profiler.costtable import CostTable, DeviceInfo, LayerRow, ModelInfo

GiB = 1 << 30


@lru_cache(maxsize=None)
def _part_bytes(name: str, dtype: str, bits: int | None, group: int) -> tuple[dict, dict]:
    from profiler import build
    from profiler.models import resolve_model

    spec = resolve_model(name)
    parts = build.model_parts(build.skeleton(spec))
    quant = {"bits": bits, "group_size": group} if bits else None

    def nbytes(mod) -> int:
        build.cast_floating(mod, build.DTYPES[dtype])
        if quant:
            mod = build._quantize_structure(mod, quant)
        return build.param_bytes(mod)

    c = spec.config
    tied = parts.lm_head is None
    sizes = {"embed": nbytes(parts.embed), "block": nbytes(parts.layers[0]),
             "head": nbytes(parts.norm) + (0 if tied else nbytes(parts.lm_head))}
    return sizes, dict(c, tie_word_embeddings=tied)


def shaped_table(name: str, dtype: str = "bfloat16", bits: int | None = 4, group: int = 64,
                 host: str = "h", speed: float = 1.0) -> CostTable:
    """A complete cost table of built-in model `name` with its real bytes (see the module
    docstring); a row's times are its weight bytes over `speed` x 10 GB/s."""
    sizes, c = _part_bytes(name, dtype, bits, group)
    H, heads = c["hidden_size"], c["num_attention_heads"]
    hd = c.get("head_dim") or H // heads
    act = 4 if dtype == "float32" else 2
    kv = 2 * c["num_key_value_heads"] * hd * act
    P, C = [16, 64], [64, 256]

    def row(rname, kind, layer):
        w = sizes[kind]
        t = max(w, 1) / (speed * 1e10)
        return LayerRow(name=rname, kind=kind, layer=layer, weight_bytes=w,
                        activation_bytes_per_token=H * act,
                        kv_bytes_per_token=kv if kind == "block" else 0,
                        peak_memory_bytes=w + 64 * H * act, prefill_s=[t * p for p in P],
                        prefill_spread=[0.01] * 2, decode_s=[t, t * 1.1],
                        decode_spread=[0.01] * 2, measured_from=rname)

    n = c["num_hidden_layers"]
    rows = ([row("embed", "embed", None)] + [row(f"layers.{i}", "block", i) for i in range(n)]
            + [row("head", "head", None)])
    return CostTable(
        model=ModelInfo(name=name, config_hash=f"sha256:{name}", n_layers=n, hidden_size=H,
                        num_attention_heads=heads, num_key_value_heads=c["num_key_value_heads"],
                        head_dim=hd, intermediate_size=c["intermediate_size"],
                        vocab_size=c["vocab_size"], tie_word_embeddings=c["tie_word_embeddings"]),
        dtype=dtype, quantization={"bits": bits, "group_size": group} if bits else None,
        device=DeviceInfo(host=host, name=f"stand-in {host}", backend="cpu", mlx_version="0",
                          memory_total_bytes=24 * GiB, memory_usable_bytes=19 * GiB,
                          memory_bandwidth_gbs=20.0 * speed, matmul_tflops=0.1 * speed),
        prefill_tokens=P, decode_context=C, rows=rows, created="2026-12-02T00:00:00Z")
