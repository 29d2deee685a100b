"""The model registry: built-ins, exo / Hugging Face aliases, local directories, config hashes."""

import json
import subprocess
import sys

import pytest

from profiler.errors import UserError
from profiler.models import (BUILTIN, config_hash, known_models, resolve_model)
from profiler.tiny import tiny_config


def test_known_models_cover_the_required_builtins():
    need = {"llama-3-8b", "llama-3-70b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b",
            "llama-3.2-1b", "llama-3.2-3b", "mistral-7b", "qwen2.5-7b", "qwen2.5-72b"}
    assert need <= set(known_models())


@pytest.mark.parametrize("alias,name", [
    ("mlx-community/Meta-Llama-3-8B-Instruct-4bit", "llama-3-8b"),
    ("mlx-community/Meta-Llama-3.1-8B-Instruct-4bit", "llama-3.1-8b"),
    ("mlx-community/Llama-3.2-1B-Instruct-4bit", "llama-3.2-1b"),
    ("mlx-community/Llama-3.3-70B-Instruct-4bit", "llama-3.3-70b"),
    ("meta-llama/Meta-Llama-3-70B-Instruct", "llama-3-70b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("LLAMA-3-8B", "llama-3-8b"),
])
def test_aliases_resolve_to_builtins(alias, name):
    spec = resolve_model(alias)
    assert spec.name == name and spec.source == "builtin" and spec.path is None
    assert spec.config["num_hidden_layers"] == BUILTIN[name]["num_hidden_layers"]


def test_mlx_community_4bit_alias_carries_its_quantization():
    spec = resolve_model("mlx-community/Meta-Llama-3-8B-Instruct-4bit")
    assert spec.config["quantization"] == {"group_size": 64, "bits": 4}
    assert spec.repo_id == "mlx-community/Meta-Llama-3-8B-Instruct-4bit"
    assert resolve_model("llama-3-8b").repo_id == "mlx-community/Meta-Llama-3-8B-Instruct-4bit"


def test_public_config_values():
    c = resolve_model("llama-3-70b").config
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
            c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]) == \
        (8192, 28672, 80, 64, 8, 128256)
    assert resolve_model("llama-3.2-1b").config["tie_word_embeddings"] is True
    assert resolve_model("llama-3.1-8b").config["rope_scaling"]["rope_type"] == "llama3"
    assert resolve_model("qwen2.5-7b").config["model_type"] == "qwen2"


def test_unknown_name_is_one_line_listing_known_names():
    with pytest.raises(UserError) as e:
        resolve_model("llama-9-999b")
    msg = str(e.value)
    assert "\n" not in msg and "llama-3-8b" in msg and "qwen2.5-72b" in msg


def test_unknown_name_on_the_cli_exits_2_without_traceback():
    p = subprocess.run([sys.executable, "-m", "profiler.cli", "no-such-model"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "llama-3-8b" in p.stderr


def test_config_path_and_local_dir(tmp_path):
    cfg = tiny_config(n_layers=2)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    spec = resolve_model(str(tmp_path / "c" / "config.json"))
    assert spec.source == "config" and spec.config["num_hidden_layers"] == 2
    spec = resolve_model(str(tmp_path / "c"))  # a directory without weights: config only
    assert spec.source == "config"
    (tmp_path / "c" / "model.safetensors").write_bytes(b"")
    spec = resolve_model(str(tmp_path / "c"))
    assert spec.source == "local" and spec.path == (tmp_path / "c").resolve()
    assert spec.name == "c"


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "config.json"))


def test_config_hash_is_about_the_architecture():
    a = dict(BUILTIN["llama-3-8b"])
    b = dict(a, torch_dtype="float16", quantization={"bits": 4, "group_size": 64},
             bos_token_id=1, architectures=["X"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a).startswith("sha256:")
    assert config_hash(a) != config_hash(dict(a, num_hidden_layers=31))
    assert config_hash(BUILTIN["llama-3-8b"]) != config_hash(BUILTIN["llama-3.1-8b"])


def test_repo_id_found_in_the_hugging_face_cache(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--someone--Tiny-4bit" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(tiny_config(n_layers=2)))
    (snap / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = resolve_model("someone/Tiny-4bit")
    assert spec.source == "local" and spec.path == snap.resolve()
    assert spec.name == "Tiny-4bit" and spec.repo_id == "someone/Tiny-4bit"


@pytest.mark.parametrize("name,billions", [
    ("llama-3-8b", 8.03), ("llama-3-70b", 70.55), ("llama-3.1-405b", 405.85),
    ("llama-3.2-1b", 1.24), ("llama-3.2-3b", 3.21), ("mistral-7b", 7.25),
    ("qwen2.5-7b", 7.62), ("qwen2.5-72b", 72.71)])
def test_builtin_models_have_their_published_parameter_counts(name, billions):
    """Built from mlx-lm with lazy parameters: nothing is allocated."""
    from profiler import build

    model = build.skeleton(resolve_model(name))
    assert build.param_count(model) / 1e9 == pytest.approx(billions, rel=0.005)


# ------------------------------------------------------------------- bad configs and weights

BAD_FIELDS = [(k, v) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                               "num_key_value_heads", "head_dim", "intermediate_size",
                               "vocab_size")
              for v in (0, -4, "32", 1.5, True, [32], 10**400, 2**31)]


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=lambda x: str(x)[:12])
def test_bad_config_field_is_one_line_naming_config_and_field(tmp_path, field, value):
    cfg = tiny_config(n_layers=2)
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        resolve_model(str(tmp_path / "config.json"))
    msg = str(e.value)
    assert "config.json" in msg and field in msg and "\n" not in msg and len(msg) < 300, msg


@pytest.mark.parametrize("change, field", [
    ({"num_attention_heads": 5, "head_dim": None}, "does not divide hidden_size"),
    ({"num_key_value_heads": 3}, "does not divide num_attention_heads"),
    ({"quantization": {"bits": 7, "group_size": 64}}, "quantization"),
    ({"quantization": "4bit"}, "quantization"),
])
def test_inconsistent_heads_and_quantization(tmp_path, change, field):
    cfg = dict(tiny_config(n_layers=2), **change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=field):
        resolve_model(str(tmp_path / "config.json"))


def test_a_huge_number_in_config_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": '
                                          + "9" * 5000 + ', "num_hidden_layers": 2}')
    with pytest.raises(UserError, match="config.json: hidden_size: an integer of 5000 digits"):
        resolve_model(str(tmp_path / "config.json"))


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    pytest.importorskip("mlx.core")
    from profiler.build import save_model_dir

    return save_model_dir(tmp_path_factory.mktemp("m") / "good", tiny_config(n_layers=2))


def _variant(tmp_path, good, weights=None, **config_change):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(good, d)
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights(
            (good / "model.safetensors").read_bytes()))
    if config_change:
        (d / "config.json").write_text(json.dumps(dict(tiny_config(n_layers=2),
                                                       **config_change)))
    return d


@pytest.mark.parametrize("weights, change, says", [
    (lambda b: b[: len(b) // 2], {}, "model.safetensors: not a readable safetensors file"),
    (lambda b: b"", {}, "the file is empty"),
    (lambda b: b"\x07" * 4096, {}, "model.safetensors: not a readable safetensors file"),
    (lambda b: b[:100], {}, "model.safetensors: not a readable safetensors file"),
    (None, {"intermediate_size": 192}, "Expected shape (192, 64)"),
    (None, {"num_hidden_layers": 3}, "Missing 9 parameters"),
], ids=["truncated", "empty", "garbage", "header-cut", "wrong-shape", "missing-layer"])
def test_bad_weights_are_one_line_naming_the_file(tmp_path, good_dir, weights, change, says):
    from profiler.build import skeleton

    d = _variant(tmp_path, good_dir, weights, **change)
    with pytest.raises(UserError) as e:
        skeleton(resolve_model(str(d)))
    msg = str(e.value)
    assert says in msg and str(d) in msg and "\n" not in msg and len(msg) < 700, msg
    assert (d / "config.json").exists()  # nothing the user had is touched


def test_bad_weights_on_the_cli_exit_2(tmp_path, good_dir):
    d = _variant(tmp_path, good_dir, lambda b: b[:-10])
    p = subprocess.run([sys.executable, "-m", "profiler", str(d), "--out", str(tmp_path / "o.json"),
                        "--quiet", "--no-microbench"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "model.safetensors" in p.stderr
    assert not (tmp_path / "o.json").exists()
