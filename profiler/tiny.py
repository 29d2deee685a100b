"""Tiny model configs for tests, examples and quick checks (milliseconds per layer).

    from profiler.tiny import tiny_config
    from profiler.build import save_model_dir
    save_model_dir("/tmp/tiny", tiny_config(n_layers=4), quantize={"bits": 4, "group_size": 64})

Plain Python: no MLX import.
"""

from __future__ import annotations

from typing import Any


def tiny_config(n_layers: int = 4, hidden: int = 64, intermediate: int = 128, heads: int = 4,
                kv_heads: int = 2, vocab: int = 256, model_type: str = "llama",
                tie: bool = False, dtype: str = "float32") -> dict[str, Any]:
    """A llama-shaped (or qwen2-shaped) config.json dict small enough to run in milliseconds.
    Dimensions are multiples of 64 so that 4-bit group-64 quantization applies everywhere."""
    cfg = {"model_type": model_type, "hidden_size": hidden, "intermediate_size": intermediate,
           "num_hidden_layers": n_layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
           "tie_word_embeddings": tie, "torch_dtype": dtype}
    if model_type == "llama":
        cfg["architectures"] = ["LlamaForCausalLM"]
    return cfg
