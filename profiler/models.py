"""Which model to profile: built-in architectures, exo / Hugging Face aliases, local directories.

`resolve_model(name_or_path)` turns what the user typed into a `ModelSpec`:

* a built-in short name (`llama-3-8b`), or an exo / Hugging Face repo id that is an alias of
  one (`mlx-community/Meta-Llama-3-8B-Instruct-4bit`, `meta-llama/Meta-Llama-3-8B`): the public
  config.json values are written below, so nothing is downloaded (time and memory do not depend
  on weight values, the profiler generates weights of the right shapes);
* a local model directory (config.json + *.safetensors, mlx-community 4-bit layouts included):
  profiled with its own weights;
* a path to a config.json (or a directory holding only a config.json): any architecture that
  mlx-lm knows, profiled with generated weights.

Plain Python: importing this module does not import MLX or mlx-lm.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profiler.errors import UserError, read_json


@dataclass
class ModelSpec:
    """A model to profile. `config` holds config.json values (with "quantization" for
    quantized mlx-community layouts); `path` is the local directory for source == "local"."""

    name: str
    repo_id: str | None
    source: str  # builtin | local | config
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    @property
    def quantization(self) -> dict[str, int] | None:
        q = self.config.get("quantization")
        return {"bits": int(q["bits"]), "group_size": int(q["group_size"])} if q else None


# -- built-in architectures (public config.json values) ----------------------------------------

_LLAMA3_ROPE_8K = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_LLAMA32_ROPE = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _llama(hidden, inter, layers, heads, kv, *, rope_scaling=None, max_pos=8192, tie=False,
           head_dim=None) -> dict[str, Any]:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
           "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv,
           "head_dim": head_dim or hidden // heads, "vocab_size": 128256,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": max_pos,
           "tie_word_embeddings": tie, "attention_bias": False, "mlp_bias": False,
           "hidden_act": "silu", "torch_dtype": "bfloat16"}
    if rope_scaling:
        cfg["rope_scaling"] = dict(rope_scaling)
    return cfg


def _qwen2(hidden, inter, layers, heads, kv, *, vocab=152064, tie=False, eps=1e-6,
           max_pos=32768) -> dict[str, Any]:
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "rms_norm_eps": eps, "rope_theta": 1000000.0, "max_position_embeddings": max_pos,
            "tie_word_embeddings": tie, "hidden_act": "silu", "torch_dtype": "bfloat16",
            "sliding_window": 131072, "use_sliding_window": False}


BUILTIN: dict[str, dict[str, Any]] = {
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, rope_scaling=_LLAMA3_ROPE_8K, max_pos=131072),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, rope_scaling=_LLAMA3_ROPE_8K,
                            max_pos=131072),
    "llama-3.1-405b": _llama(16384, 53248, 126, 128, 8, rope_scaling=_LLAMA3_ROPE_8K,
                             max_pos=131072),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, rope_scaling=_LLAMA32_ROPE, max_pos=131072,
                           tie=True, head_dim=64),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, rope_scaling=_LLAMA32_ROPE, max_pos=131072,
                           tie=True, head_dim=128),
    "llama-3.3-70b": _llama(8192, 28672, 80, 64, 8, rope_scaling=_LLAMA3_ROPE_8K,
                            max_pos=131072),
    "mistral-7b": {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                   "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "vocab_size": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False,
                   "sliding_window": None, "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2, vocab=151936, tie=True),
    "qwen2.5-1.5b": _qwen2(1536, 8960, 28, 12, 2, vocab=151936, tie=True),
    "qwen2.5-3b": _qwen2(2048, 11008, 36, 16, 2, vocab=151936, tie=True),
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4),
    "qwen2.5-72b": _qwen2(8192, 29568, 80, 64, 8),
}

# exo's model ids (mlx-community 4-bit conversions): the default repo of each built-in.
REPO_IDS: dict[str, str] = {
    "llama-3-8b": "mlx-community/Meta-Llama-3-8B-Instruct-4bit",
    "llama-3-70b": "mlx-community/Meta-Llama-3-70B-Instruct-4bit",
    "llama-3.1-8b": "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
    "llama-3.1-70b": "mlx-community/Meta-Llama-3.1-70B-Instruct-4bit",
    "llama-3.1-405b": "mlx-community/Meta-Llama-3.1-405B-Instruct-4bit",
    "llama-3.2-1b": "mlx-community/Llama-3.2-1B-Instruct-4bit",
    "llama-3.2-3b": "mlx-community/Llama-3.2-3B-Instruct-4bit",
    "llama-3.3-70b": "mlx-community/Llama-3.3-70B-Instruct-4bit",
    "mistral-7b": "mlx-community/Mistral-7B-Instruct-v0.3-4bit",
    "qwen2.5-0.5b": "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
    "qwen2.5-1.5b": "mlx-community/Qwen2.5-1.5B-Instruct-4bit",
    "qwen2.5-3b": "mlx-community/Qwen2.5-3B-Instruct-4bit",
    "qwen2.5-7b": "mlx-community/Qwen2.5-7B-Instruct-4bit",
    "qwen2.5-72b": "mlx-community/Qwen2.5-72B-Instruct-4bit",
}

# Other spellings of the same architectures: original Hugging Face repos, other quantizations.
_EXTRA_ALIASES: dict[str, list[str]] = {
    "llama-3-8b": ["meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
                   "mlx-community/Meta-Llama-3-8B-Instruct-8bit", "llama-3-8b-instruct"],
    "llama-3-70b": ["meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B-Instruct",
                    "llama-3-70b-instruct"],
    "llama-3.1-8b": ["meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                     "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B-Instruct",
                     "mlx-community/Meta-Llama-3.1-8B-Instruct-8bit",
                     "mlx-community/Meta-Llama-3.1-8B-Instruct-bf16"],
    "llama-3.1-70b": ["meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct",
                      "meta-llama/Meta-Llama-3.1-70B", "meta-llama/Meta-Llama-3.1-70B-Instruct"],
    "llama-3.1-405b": ["meta-llama/Llama-3.1-405B", "meta-llama/Llama-3.1-405B-Instruct",
                       "meta-llama/Meta-Llama-3.1-405B-Instruct"],
    "llama-3.2-1b": ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct",
                     "mlx-community/Llama-3.2-1B-Instruct-8bit"],
    "llama-3.2-3b": ["meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct",
                     "mlx-community/Llama-3.2-3B-Instruct-8bit"],
    "llama-3.3-70b": ["meta-llama/Llama-3.3-70B-Instruct",
                      "mlx-community/Llama-3.3-70B-Instruct-8bit"],
    "mistral-7b": ["mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-v0.3"],
    "qwen2.5-0.5b": ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"],
    "qwen2.5-1.5b": ["Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"],
    "qwen2.5-3b": ["Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct"],
    "qwen2.5-7b": ["Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"],
    "qwen2.5-72b": ["Qwen/Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct"],
}


def _alias_table() -> dict[str, str]:
    table = {}
    for name in BUILTIN:
        table[name.lower()] = name
    for name, repo in REPO_IDS.items():
        table[repo.lower()] = name
    for name, extra in _EXTRA_ALIASES.items():
        for a in extra:
            table[a.lower()] = name
    return table


ALIASES = _alias_table()


def known_models() -> list[str]:
    """Built-in short names, in registry order."""
    return list(BUILTIN)


def known_aliases() -> dict[str, str]:
    """Every accepted spelling (lower case) -> built-in short name."""
    return dict(ALIASES)


def _quant_from_repo(repo: str) -> dict[str, int] | None:
    low = repo.lower()
    for bits in (2, 3, 4, 5, 6, 8):
        if low.endswith(f"-{bits}bit"):
            return {"group_size": 64, "bits": bits}
    return None


def resolve_model(name_or_path: str) -> ModelSpec:
    """Turn a short name, an exo / Hugging Face repo id, a local model directory or a
    config.json path into a ModelSpec. Unknown names raise UserError (one line)."""
    text = str(name_or_path).strip()
    if not text:
        raise UserError("no model given; name one of: " + ", ".join(known_models()))
    key = text.lower()
    if key in ALIASES:
        name = ALIASES[key]
        config = copy.deepcopy(BUILTIN[name])
        repo = REPO_IDS.get(name) if key == name else text
        quant = _quant_from_repo(repo or "")
        if quant:
            config["quantization"] = quant
        return ModelSpec(name=name, repo_id=repo, source="builtin", config=config)
    p = Path(text).expanduser()
    if p.exists():
        return _resolve_path(p)
    cached = hf_cache_dir(text)
    if cached is not None:
        spec = _resolve_path(cached)
        spec.name, spec.repo_id = text.split("/")[-1], text
        return spec
    if p.is_symlink():  # a dangling link or a symlink loop: say which (profiler.files)
        from profiler.files import read_text
        read_text(p, f"model path {text}")
    looks_like_path = text.startswith((".", "/", "~")) or text.endswith(".json")
    if looks_like_path:
        raise UserError(f"model path {text} does not exist; give a model directory "
                        "(config.json + *.safetensors), a config.json, or a built-in name")
    raise UserError(f"unknown model {text!r}; known: {', '.join(known_models())} "
                    "(or an mlx-community/meta-llama/Qwen repo id of one, a repo id downloaded "
                    "to the Hugging Face cache, a local model directory, or a config.json path)")


def hf_cache_dir(repo_id: str) -> Path | None:
    """The newest local snapshot of a Hugging Face repo id in the hub cache (where exo and
    mlx-lm download models), or None. Nothing is downloaded."""
    import os

    if repo_id.count("/") != 1:
        return None
    roots = [os.environ.get("HF_HUB_CACHE"),
             os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None,
             os.path.expanduser("~/.cache/huggingface/hub")]
    folder = "models--" + repo_id.replace("/", "--")
    for root in filter(None, roots):
        snaps = Path(root) / folder / "snapshots"
        if snaps.is_dir():
            found = sorted((d for d in snaps.iterdir() if (d / "config.json").exists()),
                           key=lambda d: d.stat().st_mtime)
            if found:
                return found[-1]
    return None


def _resolve_path(p: Path) -> ModelSpec:
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.exists():
            raise UserError(f"{p} has no config.json; a model directory needs config.json "
                            "and *.safetensors (an mlx-lm / mlx-community layout)")
        config = _read_config(cfg_path)
        has_weights = any(p.glob("model*.safetensors")) or any(p.glob("*.safetensors"))
        source = "local" if has_weights else "config"
        return ModelSpec(name=p.resolve().name, repo_id=None, source=source, config=config,
                         path=p.resolve() if has_weights else None)
    config = _read_config(p)
    name = p.resolve().parent.name if p.name == "config.json" else p.stem
    return ModelSpec(name=name, repo_id=None, source="config", config=config, path=None)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = read_json(path, str(path), invalid="fix the config file")
    except ValueError as e:  # e.g. a number of more than 4300 digits (int conversion limit)
        raise UserError(f"{path}: not a usable JSON file ({str(e).split(';')[0]}); fix the "
                        "config file") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a config.json object")
    if "text_config" in config and "num_hidden_layers" not in config:
        merged = dict(config["text_config"])
        merged.setdefault("model_type", config.get("model_type"))
        for k in ("quantization", "quantization_config"):
            if k in config:
                merged[k] = config[k]
        config = merged
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        if key not in config:
            raise UserError(f"{path}: config.json has no {key!r}; it is not a transformer "
                            "config that mlx-lm can build")
    if "quantization" not in config and isinstance(config.get("quantization_config"), dict):
        qc = config["quantization_config"]
        if "bits" in qc and "group_size" in qc:
            config["quantization"] = {"bits": qc["bits"], "group_size": qc["group_size"]}
    validate_config(config, path)
    return config


# Shape fields of a config.json: whole numbers 1..MAX_DIM (MLX shapes are 32-bit). The first
# two are required (checked above); the others are checked when present.
SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "vocab_size")
MAX_DIM = 2**31 - 1


def validate_config(config: dict[str, Any], path: str | Path) -> None:
    """Refuse a config whose shape fields cannot build a model, one line naming the field:
    not whole numbers 1..2**31-1 (0, negative, a string, a float, a bool), attention heads
    that do not divide hidden_size (without an explicit head_dim), key/value heads that do
    not divide the attention heads, and a quantization that is not bits 2..8 / group 32..128."""
    where = f"{path}" if str(path).endswith(".json") else f"{path}/config.json"

    def bad(field_: str, problem: str) -> UserError:
        return UserError(f"{where}: {field_} {problem}; fix config.json")

    for key in SIZE_FIELDS:
        if key not in config or (key == "head_dim" and config[key] is None):
            continue
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(key, f"is {_shown(v)}, not a whole number (e.g. 32)")
        if not 1 <= v <= MAX_DIM:
            raise bad(key, f"is {_shown(v)}; it must be from 1 to {MAX_DIM}")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and config.get("head_dim") is None and config["hidden_size"] % heads:
        raise bad("num_attention_heads", f"({heads}) does not divide hidden_size "
                  f"({config['hidden_size']})")
    if heads and kv and heads % kv:
        raise bad("num_key_value_heads", f"({kv}) does not divide num_attention_heads ({heads})")
    q = config.get("quantization")
    if q is not None:
        if not isinstance(q, dict) or q.get("bits") not in (2, 3, 4, 5, 6, 8) \
                or q.get("group_size") not in (32, 64, 128):
            raise bad("quantization", f"is {_shown(q)}; expected {{\"bits\": 2|3|4|5|6|8, "
                      "\"group_size\": 32|64|128}")


def _shown(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**30:
        return f"a {'negative ' if v < 0 else ''}number of {len(str(abs(v)))} digits"
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 40 else s[:40] + f"... ({len(s)} characters)"


# -- identity -----------------------------------------------------------------------------------

ARCH_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
    "layer_norm_eps", "rope_theta", "rope_scaling", "rope_traditional",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "layer_types", "num_experts",
    "num_experts_per_tok", "num_local_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
    "partial_rotary_factor", "hidden_act",
)


def arch_config(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture keys of a config (what changes shapes or compute), with defaults
    normalised so that a built-in and a local directory of the same model agree."""
    out = {k: config[k] for k in ARCH_KEYS if k in config and config[k] is not None}
    if "mistral" == out.get("model_type"):
        out["model_type"] = "llama"  # mlx-lm builds mistral with the llama module
    heads = out.get("num_attention_heads")
    if heads:
        out.setdefault("num_key_value_heads", heads)
        out.setdefault("head_dim", out["hidden_size"] // heads)
    out.pop("hidden_act", None)
    if out.get("use_sliding_window") is False:
        out.pop("sliding_window", None)
        out.pop("use_sliding_window", None)
    return out


def config_hash(config: dict[str, Any]) -> str:
    """"sha256:<hex>" over the canonical JSON of the architecture keys (see ARCH_KEYS)."""
    canon = json.dumps(arch_config(config), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()
