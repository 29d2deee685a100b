"""Synthetic but format-valid cost tables for tests and benchmarks (no MLX).

`make_table(host, n_layers, decode_s=..., ...)` builds a CostTable whose rows carry the given
per-layer numbers; `write_cluster(tmpdir, nodes, links, default_link)` writes tables and a cluster
file to disk so the real loaders are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from profiler.costtable import CostTable, DeviceInfo, LayerRow, ModelInfo, write_table

GiB = 1 << 30
MiB = 1 << 20


def _per_layer(v, n):
    if isinstance(v, (list, tuple)):
        assert len(v) == n
        return list(v)
    return [v] * n


def make_table(host: str = "node", n_layers: int = 8, decode_s: float | Sequence[float] = 0.01,
               prefill_s_per_token: float | Sequence[float] | None = None,
               weight_bytes: int | Sequence[int] = 100 * MiB, kv_bytes_per_token: int = 4096,
               activation_bytes_per_token: int = 8192, buffer_bytes: int = 8 * MiB,
               embed_decode_s: float = 0.001, head_decode_s: float = 0.002,
               embed_bytes: int = 200 * MiB, head_bytes: int = 200 * MiB,
               memory_usable: int = 16 * GiB, memory_total: int | None = None,
               bandwidth_gbs: float = 100.0, tflops: float = 10.0,
               model: str = "toy", config_hash: str = "sha256:toy", hidden_size: int = 4096,
               decode_context: Sequence[int] = (128, 1024), context_slope: float = 0.1,
               prefill_tokens: Sequence[int] = (16, 64, 256), tie: bool = False) -> CostTable:
    """A table whose block i decodes in decode_s[i] at the first context (x (1 + context_slope)
    at the last) and prefills in prefill_s_per_token[i] x tokens (default 0.5 x decode_s)."""
    dec = _per_layer(decode_s, n_layers)
    pf = _per_layer(prefill_s_per_token if prefill_s_per_token is not None
                    else [d * 0.5 for d in dec], n_layers)
    wb = _per_layer(weight_bytes, n_layers)
    nd = len(decode_context)

    def dgrid(t):
        return [t * (1 + context_slope * k / max(1, nd - 1)) for k in range(nd)]

    def row(name, kind, layer, w, d, p, kv):
        return LayerRow(name=name, kind=kind, layer=layer, weight_bytes=int(w),
                        activation_bytes_per_token=activation_bytes_per_token,
                        kv_bytes_per_token=kv, peak_memory_bytes=int(w + buffer_bytes),
                        prefill_s=[p * n for n in prefill_tokens],
                        prefill_spread=[0.01] * len(prefill_tokens),
                        decode_s=dgrid(d), decode_spread=[0.01] * nd, measured_from=name)

    rows = [row("embed", "embed", None, embed_bytes, embed_decode_s, embed_decode_s * 0.5, 0)]
    rows += [row(f"layers.{i}", "block", i, wb[i], dec[i], pf[i], kv_bytes_per_token)
             for i in range(n_layers)]
    rows.append(row("head", "head", None, head_bytes, head_decode_s, head_decode_s * 0.5, 0))
    return CostTable(
        model=ModelInfo(name=model, config_hash=config_hash, n_layers=n_layers,
                        hidden_size=hidden_size, tie_word_embeddings=tie),
        dtype="bfloat16", quantization=None,
        device=DeviceInfo(host=host, name=f"synthetic {host}", backend="cpu", mlx_version="0",
                          memory_total_bytes=int(memory_total or memory_usable * 1.25),
                          memory_usable_bytes=int(memory_usable),
                          memory_bandwidth_gbs=bandwidth_gbs, matmul_tflops=tflops),
        prefill_tokens=list(prefill_tokens), decode_context=list(decode_context), rows=rows,
        method={"synthetic": True}, created="2026-11-22T00:00:00Z")


def write_cluster(directory, tables: dict[str, CostTable], links: Sequence[dict] = (),
                  default_link: dict | None = None, extra_nodes: Sequence[dict] = (),
                  node_fields: dict[str, dict] | None = None, model: str | None = None,
                  name: str = "cluster.json", order: Sequence[str] | None = None) -> Path:
    """Write each table to DIR/profiles/<id>.json and a cluster file DIR/<name>; return its path."""
    d = Path(directory)
    (d / "profiles").mkdir(parents=True, exist_ok=True)
    nodes = []
    for nid in (order or list(tables)):
        write_table(tables[nid], d / "profiles" / f"{nid}.json")
        nodes.append({"id": nid, "profile": f"profiles/{nid}.json",
                      **(node_fields or {}).get(nid, {})})
    nodes += list(extra_nodes)
    data = {"model": model or next(iter(tables.values())).model.name, "nodes": nodes,
            "links": list(links)}
    if default_link is not None:
        data["default_link"] = default_link
    p = d / name
    p.write_text(json.dumps(data, indent=1))
    return p


def studio_mini_air_tables() -> dict[str, CostTable]:
    """Three unequal 32-layer nodes (fast and large, middling, slow and small): the legacy-exo
    tests' cluster."""
    return {"studio": make_table("studio", 32, decode_s=0.001, memory_usable=48 * GiB,
                                 memory_total=64 * GiB),
            "mini": make_table("mini", 32, decode_s=0.004, memory_usable=12 * GiB,
                               memory_total=16 * GiB),
            "air": make_table("air", 32, decode_s=0.008, memory_usable=6 * GiB,
                              memory_total=8 * GiB)}
