"""Hybrid runs: tensor-parallel groups with UNEQUAL shares inside a pipeline, on real processes.

Real mx.distributed ring processes over loopback, a real mlx-lm model directory (tiny llama,
8 query heads over 4 KV heads, random float32 weights). The reference is mlx-lm's own forward
of the whole model in this process; the runs must give its greedy tokens exactly and its logits
within float32 tolerance. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

from exo_bridge.runner.run import make_prompt, model_spec, run_stages  # noqa: E402
from exo_bridge.runner.tensor import TensorPlanError, hybrid_layout  # noqa: E402
from graphsplit.plan import Stage  # noqa: E402
from tests.test_runner import make_tiny_dir  # noqa: E402


def HybridStage(node, start, end, tensor=None):  # noqa: N802 - a plan stage, tensor as in I4
    return Stage(node, start, end, tensor)

CFG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4,
       "intermediate_size": 96, "num_attention_heads": 8, "num_key_value_heads": 4,
       "vocab_size": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
       "max_position_embeddings": 512, "attention_bias": True, "mlp_bias": True}
PROMPT, NEW = 10, 6
ATOL = 1e-4  # float32 logits of order 1; the sums differ only in their order


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The model directory, its biases random (not zero): o_proj's and down_proj's must be added
    once, after the all-reduce, on every member."""
    from mlx.utils import tree_flatten

    path = make_tiny_dir(tmp_path_factory.mktemp("model") / "tiny-gqa", CFG)
    w = mx.load(str(path / "model.safetensors"))
    for i, (k, v) in enumerate(sorted(w.items())):
        if k.endswith(".bias"):
            w[k] = mx.random.normal(v.shape, key=mx.random.key(i)) * 0.5
    assert sum(k.endswith("o_proj.bias") for k in w) == CFG["num_hidden_layers"]
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(w)))
    return path


@pytest.fixture(scope="module")
def reference(tiny):
    """(tokens, logits per token) of the whole model, mlx-lm's forward, greedy."""
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny)
    cache = model.make_cache()
    logits = model(mx.array([make_prompt(CFG["vocab_size"], PROMPT)]), cache=cache)
    toks, logs = [], []
    for _ in range(NEW):
        last = logits[0, -1]
        toks.append(int(mx.argmax(last).item()))
        logs.append(last.tolist())
        logits = model(mx.array([[toks[-1]]]), cache=cache)
    assert len(set(toks)) > 1  # a model that says one token only would prove little
    return toks, logs


def _check(res, reference):
    toks, logs = reference
    assert res.tokens == toks
    got = res.ranks[-1]["logits"]
    assert len(got) == NEW
    worst = max(abs(a - b) for g, w in zip(got, logs) for a, b in zip(g, w))
    assert worst < ATOL


@pytest.mark.slow
@pytest.mark.parametrize("collective, kind", [("auto", "neighbour-chain"),
                                              ("all_sum", "all_sum")])
def test_three_node_unequal_tensor_run_equals_single_process(tiny, reference, collective, kind):
    """One tensor group of 3 ranks, KV heads 2/1/1 and MLP columns 48/32/16. On the ring
    backend the all-reduce is the neighbour chain; the group is the whole world, so
    mx.distributed.all_sum can be asked for too."""
    stages = [HybridStage("a", 0, 4, {"nodes": ["a", "b", "c"], "kv_heads": [2, 1, 1],
                                      "mlp_columns": [48, 32, 16]})]
    res = run_stages(stages, model_spec(str(tiny), None), PROMPT, NEW, timeout_s=180,
                     extra={"return_logits": True, "collective": collective})
    _check(res, reference)
    assert [r["collective"] for r in res.ranks] == [kind] * 3
    assert all(len(r["allreduce_s"]) == 2 * 4 * NEW for r in res.ranks)  # 2 per block per step


@pytest.mark.slow
def test_hybrid_tensor_stage_then_pipeline_stage(tiny, reference):
    """A 2-rank tensor stage (KV heads 3/1, columns 70/26) then a 1-rank pipeline stage: the
    group is inside the pipeline, so on the ring backend (no Group.split) its all-reduce is the
    neighbour chain; the group's last member sends the stage output on."""
    stages = [HybridStage("a", 0, 2, {"nodes": ["a", "b"], "kv_heads": [3, 1],
                                      "mlp_columns": [70, 26]}), HybridStage("c", 2, 4)]
    res = run_stages(stages, model_spec(str(tiny), None), PROMPT, NEW, timeout_s=180,
                     extra={"return_logits": True})
    _check(res, reference)
    assert [r["collective"] for r in res.ranks] == ["neighbour-chain"] * 2 + ["none"]
    assert [r["stage"] for r in res.ranks] == [[0, 2], [0, 2], [2, 4]]


@pytest.mark.slow
def test_cli_runs_a_plan_with_a_three_rank_group_after_a_pipeline_stage(tiny, reference,
                                                                        tmp_path):
    """The plan file's `tensor` member (plan format I4) through `exo-bridge run`: a one-node
    stage, then a 3-rank group whose leader receives and broadcasts along the chain."""
    plan = {"format": "mlx-split/plan", "version": 1, "runtime": "mlx-pipeline",
            "model": {"name": "tiny-gqa", "n_layers": 4, "n_kv_heads": 4,
                      "intermediate_size": 96},
            "workload": {"prompt_tokens": PROMPT},
            "stages": [{"node": "p", "start_layer": 0, "end_layer": 1},
                       {"node": "a", "start_layer": 1, "end_layer": 4,
                        "tensor": {"nodes": ["a", "b", "c"], "kv_heads": [1, 1, 2],
                                   "mlp_columns": [16, 40, 40]}}]}
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.runner", str(p), "--model", str(tiny),
                         "--max-tokens", str(NEW), "--json"],
                        capture_output=True, text=True, timeout=240)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)["results"][0]
    assert out["tokens"] == reference[0]
    assert [r["collective"] for r in out["ranks"]] == ["none"] + ["neighbour-chain"] * 3


def _cli(tmp_path, tensor, *extra, kv=4):
    plan = {"format": "mlx-split/plan", "version": 1, "runtime": "mlx-pipeline",
            "model": {"name": "tiny-gqa", "n_layers": 4, "n_kv_heads": kv,
                      "intermediate_size": 96},
            "stages": [{"node": "a", "start_layer": 0, "end_layer": 4, "tensor": tensor}]}
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(CFG))  # never loaded: refused first
    return subprocess.run([sys.executable, "-m", "exo_bridge.runner", str(p), "--model",
                           str(tmp_path / "m"), *extra], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("tensor, kv, says", [
    ({"nodes": ["a", "b"], "kv_heads": [3, 2], "mlp_columns": [48, 48]}, 4, "sums to 5"),
    ({"nodes": ["a", "b"], "kv_heads": [4, 0], "mlp_columns": [48, 48]}, 4, "kv_heads[1]"),
    ({"nodes": ["a", "b"], "kv_heads": [2, 2], "mlp_columns": [90, 10, 6]}, 4, "one share per"),
    ({"nodes": ["b", "a"], "kv_heads": [2, 2], "mlp_columns": [48, 48]}, 4, "first member"),
    # the plan agrees with itself but not with the model given by --model: the runner refuses
    ({"nodes": ["a", "b"], "kv_heads": [1, 1], "mlp_columns": [48, 48]}, 2,
     "the model given to the run: stages[0].tensor.kv_heads: [1, 1] sums to 2 but the model "
     "has 4"),
])
def test_plan_the_runner_cannot_cut_is_one_line_exit_2(tmp_path, tensor, kv, says):
    cp = _cli(tmp_path, tensor, kv=kv)
    assert cp.returncode == 2, cp.stderr
    err = cp.stderr.strip()
    assert "\n" not in err and says in err and "Traceback" not in err


def test_tensor_plan_under_an_exo_protocol_is_refused(tmp_path):
    cp = _cli(tmp_path, {"nodes": ["a", "b"], "kv_heads": [2, 2], "mlp_columns": [48, 48]},
              "--protocol", "exo-current")
    assert cp.returncode == 2
    assert "ring protocol only" in cp.stderr and "\n" not in cp.stderr.strip()


def test_layout_puts_each_group_contiguous_leader_first():
    stages = [HybridStage("x", 0, 1), HybridStage("a", 1, 4, {
        "nodes": ["a", "b", "c"], "kv_heads": [1, 1, 2], "mlp_columns": [16, 40, 40]})]
    lay = hybrid_layout(stages, CFG)
    assert [(r.node, r.group, r.pos, r.kv, r.cols) for r in lay] == [
        ("x", 0, 0, (0, 4), (0, 96)), ("a", 1, 0, (0, 1), (0, 16)),
        ("b", 1, 1, (1, 2), (16, 56)), ("c", 1, 2, (2, 4), (56, 96))]
    with pytest.raises(TensorPlanError, match="node a appears"):
        hybrid_layout([HybridStage("a", 0, 1), stages[1]], CFG)
