"""Building models and single layers with mlx-lm, without downloading anything.

The profiler never holds a whole large model in memory. `skeleton(spec)` builds the mlx-lm
`Model` with *lazy* parameters (MLX allocates nothing until `mx.eval`; for a local directory
`load_model(path, lazy=True)` maps the safetensors without reading them). One layer at a time is
then made real with `materialise(...)`: generated weights of the right shapes and dtype for
built-in models (time and memory do not depend on weight values), the directory's own weights
for a local model; quantized with `nn.quantize` when asked. After it is measured, every
reference to it is dropped (`release(...)`).

`save_model_dir(path, config, seed, quantize)` writes a real, mlx-lm-loadable model directory
with random weights: the tests and the other packages use it for tiny models.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from profiler.errors import UserError
from profiler.models import ModelSpec

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def mx_dtype(name: str) -> mx.Dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"dtype {name!r} is not supported; use one of "
                        f"{', '.join(DTYPES)}") from None


def dtype_name(dt: mx.Dtype) -> str:
    for k, v in DTYPES.items():
        if v == dt:
            return k
    return str(dt).replace("mlx.core.", "")


def arch_classes(config: dict[str, Any]):
    """(Model class, ModelArgs class, architecture module) for a config, via mlx-lm."""
    from mlx_lm.utils import _get_classes

    try:
        model_cls, args_cls = _get_classes(config)
    except ValueError:
        raise UserError(f"model_type {config.get('model_type')!r} is not known to the "
                        "installed mlx-lm; upgrade mlx-lm or use a supported model") from None
    return model_cls, args_cls, importlib.import_module(model_cls.__module__)


def model_args(config: dict[str, Any]):
    _, args_cls, _ = arch_classes(config)
    try:
        return args_cls.from_dict(config)
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"config does not build a {config.get('model_type')} model: {e}") \
            from None


def skeleton(spec: ModelSpec) -> nn.Module:
    """The whole model with lazy parameters: nothing is allocated until a layer is evaluated."""
    if spec.source == "local":
        from mlx_lm.utils import load_model

        check_weight_files(Path(spec.path))
        try:
            model, _ = load_model(Path(spec.path), lazy=True)
        except (ValueError, FileNotFoundError) as e:  # shapes / names that do not match
            msg = " ".join(str(e).split())
            msg = msg if len(msg) <= 300 else msg[:300] + "..."
            raise UserError(f"cannot load model directory {spec.path}: {msg}; the weights do "
                            "not match its config.json (re-convert the model, or fix "
                            "config.json)") from None
        return model
    config = {k: v for k, v in spec.config.items() if k not in ("quantization",
                                                                 "quantization_config")}
    model_cls, _, _ = arch_classes(config)
    return model_cls(model_args(config))


def check_weight_files(path: Path) -> None:
    """Open every *.safetensors of a model directory with MLX (headers and offsets only; the
    arrays stay lazy): an empty, truncated or garbage file is one line naming it."""
    for f in sorted(path.glob("*.safetensors")):
        try:
            mx.load(str(f))
        except RuntimeError as e:  # MLX's load_safetensors errors ("[load_safetensors] ...")
            why = " ".join(str(e).split()).replace(f"file {f}", "").strip()
            if f.stat().st_size == 0:
                why = "the file is empty"
            raise UserError(f"{f}: not a readable safetensors file ({why}); download or convert "
                            "the model again") from None


@dataclass
class Parts:
    """The pieces of an mlx-lm model the profiler times separately."""

    embed: nn.Module  # token embedding (nn.Embedding or QuantizedEmbedding)
    layers: list  # the transformer blocks, in order
    norm: nn.Module  # final norm
    lm_head: nn.Module | None  # None when tied to the embedding
    container: Any  # object holding embed_tokens / layers / norm
    model: Any = None  # the whole model (holds lm_head)
    embed_ready: bool = False  # the embedding has been materialised

    @property
    def tied(self) -> bool:
        return self.lm_head is None


    def set_embed(self, module: nn.Module) -> None:
        self.embed = module
        self.container.embed_tokens = module

    def set_head(self, module: nn.Module) -> None:
        self.lm_head = module
        self.model.lm_head = module


def model_parts(model: nn.Module) -> Parts:
    inner = getattr(model, "model", None) or getattr(model, "language_model", None) or model
    if hasattr(inner, "model") and not hasattr(inner, "embed_tokens"):
        inner = inner.model
    embed = getattr(inner, "embed_tokens", None) or getattr(inner, "wte", None)
    norm = getattr(inner, "norm", None) or getattr(inner, "ln_f", None)
    layers = getattr(inner, "layers", None) or getattr(inner, "h", None)
    if embed is None or norm is None or layers is None:
        raise UserError(f"{type(model).__module__} has no embed_tokens / layers / norm that "
                        "the profiler can time separately; only decoder-only mlx-lm "
                        "architectures of the llama family are supported")
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None and hasattr(model, "language_model"):
        lm_head = getattr(model.language_model, "lm_head", None)
    return Parts(embed=embed, layers=layers, norm=norm, lm_head=lm_head, container=inner,
                 model=model)


# -- weights ----------------------------------------------------------------------------------

def param_bytes(module: nn.Module) -> int:
    """Bytes of every array of a module (quantized weights, scales and biases included).
    Works on lazy parameters: shapes and dtypes are known before evaluation."""
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def param_count(module: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def structure(module: nn.Module, with_dtype: bool) -> tuple:
    """A hashable description of a block's structure: class, parameter paths and shapes (and
    dtypes for real weights), plus its plain scalar attributes (e.g. sliding-window flags).
    Blocks with equal structure cost the same time, so one can be measured for all."""
    params = tuple((k, tuple(v.shape)) + ((str(v.dtype),) if with_dtype else ())
                   for k, v in tree_flatten(module.parameters()))
    attrs = tuple(sorted((k, v) for k, v in vars(module).items()
                         if not k.startswith("_") and isinstance(v, (bool, int, float, str))))
    return (type(module).__name__, params, attrs)


def random_weights(module: nn.Module, dtype: mx.Dtype, seed: int | None = None) -> None:
    """Replace every floating parameter with normal noise of `dtype` (norm weights ~ 1, the rest
    std 0.02, like a trained model's scale) - lazily; `mx.eval` makes them real."""
    if seed is not None:
        mx.random.seed(seed)

    def make(path: str, v: mx.array) -> mx.array:
        if not mx.issubdtype(v.dtype, mx.floating):
            return v
        if v.ndim == 1 and "norm" in path:
            return mx.ones(v.shape, dtype=dtype)
        if v.ndim == 1:  # biases
            return mx.zeros(v.shape, dtype=dtype)
        return noise(v.shape, dtype)

    flat = [(k, make(k, v)) for k, v in tree_flatten(module.parameters())]
    from mlx.utils import tree_unflatten

    module.update(tree_unflatten(flat))


def noise(shape, dtype: mx.Dtype, std: float = 0.02, rows: int = 256) -> mx.array:
    """Normal noise of `shape`: for large matrices, `rows` random rows repeated down the first
    axis (generating 10^9 normals takes a minute on one CPU core; a matmul's time does not
    depend on the values, and repeated rows quantize exactly as costly)."""
    shape = tuple(shape)
    if len(shape) == 2 and shape[0] > 2 * rows:
        reps = -(-shape[0] // rows)
        base = (mx.random.normal((rows, shape[1]), dtype=mx.float32) * std).astype(dtype)
        return mx.tile(base, (reps, 1))[: shape[0]]
    return (mx.random.normal(shape, dtype=mx.float32) * std).astype(dtype)


def cast_floating(module: nn.Module, dtype: mx.Dtype) -> None:
    """Cast a module's floating parameters (scales and biases of quantized layers included)."""
    module.update(tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating)
                           else v, module.parameters()))


def floating_dtype(module: nn.Module) -> mx.Dtype | None:
    """The dtype of the largest floating parameter (a local model's activation dtype)."""
    best = None
    for _, v in tree_flatten(module.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and (best is None or v.size > best.size):
            best = v
    return None if best is None else best.dtype


def is_quantized(module: nn.Module) -> bool:
    return any(k.endswith(".scales") or k == "scales"
               for k, _ in tree_flatten(module.parameters()))


def quantize_module(module: nn.Module, bits: int, group_size: int) -> None:
    """nn.quantize every Linear / Embedding whose input size is a multiple of group_size."""

    def pred(path, m):
        return hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0

    nn.quantize(module, group_size=group_size, bits=bits, class_predicate=pred)


def materialise(module: nn.Module, *, generated: bool, dtype: mx.Dtype,
                quant: dict[str, int] | None, seed: int | None = None) -> nn.Module:
    """Make one layer real in memory: generated weights (built-in) or the lazily mapped real
    weights (local), cast to `dtype`, quantized when asked and not already quantized.
    Returns the module to use: a leaf (Linear / Embedding) is replaced by its quantized
    version, so the caller must store the result back in the model."""
    if generated and quant:
        # Quantize the lazy structure first, then fill it with quantized noise directly: the
        # full-precision matrices are never made (faster, and no 2 GiB float32 transient for
        # an 8B embedding).
        module = _quantize_structure(module, quant)
        random_weights(module, dtype, seed)
        random_quantized(module, dtype, quant)
    elif generated:
        random_weights(module, dtype, seed)
    else:
        if floating_dtype(module) != dtype:
            cast_floating(module, dtype)
        if quant and not is_quantized(module):
            module = _quantize_structure(module, quant)
    mx.eval(module.parameters())
    return module


def _quantize_structure(module: nn.Module, quant: dict[str, int]) -> nn.Module:
    if is_quantized(module):
        return module
    if hasattr(module, "to_quantized"):  # a leaf: Linear / Embedding
        if module.weight.shape[-1] % quant["group_size"] == 0:
            return module.to_quantized(group_size=quant["group_size"], bits=quant["bits"])
        return module
    quantize_module(module, quant["bits"], quant["group_size"])
    return module


def random_quantized(module: nn.Module, dtype: mx.Dtype, quant: dict[str, int],
                     rows: int = 256) -> None:
    """Fill every quantized leaf (QuantizedLinear / QuantizedEmbedding) with the quantization
    of normal noise: `rows` rows are quantized and repeated down the output axis (groups run
    along the input axis, so this equals quantizing the repeated matrix)."""
    leaves = [module] if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) else \
        [m for _, m in module.named_modules()
         if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    for m in leaves:
        out_dim = m.weight.shape[0]
        in_dim = m.weight.shape[1] * 32 // m.bits
        base = noise((min(out_dim, rows), in_dim), dtype, rows=rows)
        w, scales, *biases = mx.quantize(base, group_size=m.group_size, bits=m.bits)
        reps = -(-out_dim // base.shape[0])

        def tile(a):
            return mx.tile(a, (reps, 1))[:out_dim] if reps > 1 else a

        m.weight, m.scales = tile(w), tile(scales)
        if biases and getattr(m, "biases", None) is not None:
            m.biases = tile(biases[0])


def release(parts: Parts, index: int | None = None) -> None:
    """Drop the arrays of a finished layer so MLX can free them (the skeleton keeps a lazy
    placeholder of the same class, so later structure checks still work)."""
    if index is not None:
        parts.layers[index] = None
    mx.clear_cache()


# -- tiny model directories ---------------------------------------------------------------------

def save_model_dir(path: str | Path, config: dict[str, Any], seed: int = 0,
                   quantize: dict[str, int] | tuple[int, int] | int | None = None) -> Path:
    """Write a real model directory (config.json + model.safetensors) with random weights that
    `mlx_lm.utils.load_model` loads. `config` is a config.json dict (e.g. a tiny llama: hidden
    64, 2-4 layers); "torch_dtype" picks the weight dtype (default float32). `quantize` is
    {"bits": 4, "group_size": 64}, (bits, group_size) or bits (group 64): the weights are then
    stored as mlx-community layouts are (uint32 packed weights + scales + biases)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(config))
    config.pop("quantization", None)
    model_cls, _, _ = arch_classes(config)
    model = model_cls(model_args(config))
    dt = mx_dtype(config.get("torch_dtype", "float32"))
    random_weights(model, dt, seed)
    if quantize:
        if isinstance(quantize, int):
            quantize = {"bits": quantize, "group_size": 64}
        elif isinstance(quantize, (tuple, list)):
            quantize = {"bits": int(quantize[0]), "group_size": int(quantize[1])}
        quantize = {"group_size": int(quantize["group_size"]), "bits": int(quantize["bits"])}
        quantize_module(model, quantize["bits"], quantize["group_size"])
        config["quantization"] = quantize
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def safetensors_bytes(path: str | Path, prefix: str) -> int:
    """Bytes of the tensors under `prefix` in a model directory's safetensors (header read
    only): what a layer's weights occupy on disk."""
    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__" and (k == prefix or k.startswith(prefix + ".")):
                a, b = v["data_offsets"]
                total += b - a
    return total
