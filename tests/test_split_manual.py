"""Manual splits: `split-model CLUSTER --layers studio:20,mini:12` predicts the split beside the
optimum and exo's baselines; the plan it writes (and `--layers` itself) is accepted by
`exo-bridge place` (a real exo-shaped HTTP server) and `exo-bridge run` (real mx.distributed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from costtables import GiB, make_table, write_cluster
from exo_bridge.exo_current import schema as exo_api
from exo_bridge.cli import main as bridge_main
from graphsplit.api import make_plan
from graphsplit.cli import main as split_main
from graphsplit.cluster import load_cluster
from graphsplit.costmodel import Workload, predict
from graphsplit.manual import apply_layers, parse_layers
from graphsplit.plan import Plan, Stage, read_plan, stage_dict, write_plan

MODEL = "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"


@pytest.fixture
def cluster(tmp_path):
    t = {n: make_table(n, 32, decode_s=d, memory_usable=u * GiB, model="llama-3.1-8b")
         for n, d, u in (("studio", 0.001, 48), ("mini", 0.004, 12), ("air", 0.008, 10))}
    return write_cluster(tmp_path, t, model="llama-3.1-8b")


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("spec, needles", [
    ("studio:20,laptop:12", ["--layers laptop:12", "'laptop' is not in the cluster",
                             "air, mini, studio"]),
    ("studio:20,mini:10", ["counts sum to 30", "model has 32 layers"]),
    ("studio:32,mini:0", ["mini:0", "at least 1 layer"]),
    ("studio:34,mini:-2", ["mini:-2", "at least 1 layer"]),
    ("studio:20.5,mini:11.5", ["studio:20.5", "'20.5' is not a whole number"]),
    ("studio:twenty,mini:12", ["'twenty' is not a whole number"]),
    ("studio:20,studio:12", ["studio:12", "given twice"]),
    ("studio:20,mini", ["item 'mini' is not NODE:COUNT"]),
    ("studio:20,,mini:12", ["item '' is not NODE:COUNT"]),
    ("", ["--layers: empty"]),
])
def test_bad_layers_are_one_line(cluster, capsys, spec, needles):
    rc = split_main([str(cluster), "--layers", spec])
    one_line_error(rc, capsys.readouterr().err, *needles)


def test_manual_split_predicted_beside_optimum_and_baselines(cluster, tmp_path, capsys):
    out = tmp_path / "manual.json"
    rc = split_main([str(cluster), "--layers", "mini:12,studio:20", "--prompt-tokens", "64",
                     "--context-tokens", "256", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    for needle in ("manual split --layers mini:12,studio:20 (execution order as written)",
                   "unused: air (not in --layers)", "\nmanual ", "\noptimal ", "\nexo-legacy ",
                   "\nexo-current ", "\neven "):
        assert needle in text, text
    plan = read_plan(out)
    # execution order as written (not the cluster file's), recorded as manual
    assert plan.stages == [Stage("mini", 0, 12), Stage("studio", 12, 32)]
    assert plan.solver["manual"] is True and plan.solver["layers"] == "mini:12,studio:20"
    # the printed numbers are the cost model's prediction for exactly these stages
    c, wl = load_cluster(cluster), Workload(64, 256, 1)
    want = predict(c, plan.stages, wl, "exo-current")
    assert plan.predicted["tpot_s"] == pytest.approx(want.tpot_s)
    manual_row = next(ln for ln in text.splitlines()
                      if ln.startswith("manual ") and "split" not in ln)
    assert f"{want.tpot_s * 1e3:.2f}" in manual_row
    # the optimum beside it is the solver's plan for the same inputs, and no worse
    best = make_plan(c, "latency", wl, "exo-current")
    assert plan.baselines["optimal"]["stages"] == [stage_dict(s) for s in best.stages]
    assert plan.baselines["optimal"]["predicted"]["tpot_s"] <= want.tpot_s
    assert set(plan.baselines) == {"optimal", "exo-legacy", "exo-current", "exo-current-tensor",
                                   "even"}
    # exo-bridge compare shows it as the manual split
    assert bridge_main(["compare", str(out)]) == 0
    assert "manual (this plan)" in capsys.readouterr().out


def test_parse_layers_is_the_one_validator():
    stages = parse_layers("air:2, studio:1", ["studio", "air"], 3)
    assert stages == [Stage("air", 0, 2), Stage("studio", 2, 3)]


def test_apply_layers_repredicts_from_the_cluster_file(cluster, tmp_path):
    c = load_cluster(cluster)
    plan = make_plan(c, "latency", Workload(64, 256, 1), "exo-current", cluster_file=str(cluster))
    manual = apply_layers(plan, "air:4,mini:28")
    assert manual.stages == [Stage("air", 0, 4), Stage("mini", 4, 32)]
    assert manual.solver["manual"] is True
    want = predict(c, manual.stages, Workload(64, 256, 1), "exo-current")
    assert manual.predicted["tpot_s"] == pytest.approx(want.tpot_s)
    plan.cluster_file = None  # no tables: the old prediction is dropped, never kept stale
    assert apply_layers(plan, "air:4,mini:28").predicted == {}


def test_place_accepts_the_manual_plan_and_layers(cluster, tmp_path, capsys):
    from exo_server import GIB, ExoServer, FakeNode

    nodes = [FakeNode("id-studio", "studio", 64 * GIB, 48 * GIB, "10.0.0.1"),
             FakeNode("id-mini", "mini", 16 * GIB, 12 * GIB, "10.0.0.2"),
             FakeNode("id-air", "air", 16 * GIB, 10 * GIB, "10.0.0.3")]
    out = tmp_path / "manual.json"
    assert split_main([str(cluster), "--layers", "mini:12,studio:20", "--out", str(out)]) == 0
    optimal = tmp_path / "optimal.json"
    assert split_main([str(cluster), "--out", str(optimal)]) == 0
    capsys.readouterr()
    with ExoServer(nodes) as srv:
        assert bridge_main(["place", "--plan", str(out), "--api", srv.url, "--model", MODEL,
                            "--dry-run"]) == 0
        ranks = exo_api.instance_summary(exo_api.parse_instance(json.loads(
            capsys.readouterr().out)))
        assert ranks == [(0, "id-mini", 0, 12), (1, "id-studio", 12, 32)]
        assert bridge_main(["place", "--plan", str(optimal), "--api", srv.url, "--model", MODEL,
                            "--layers", "air:4,studio:28", "--dry-run"]) == 0
        ranks = exo_api.instance_summary(exo_api.parse_instance(json.loads(
            capsys.readouterr().out)))
        assert ranks == [(0, "id-air", 0, 4), (1, "id-studio", 4, 32)]
        rc = bridge_main(["place", "--plan", str(optimal), "--api", srv.url, "--model", MODEL,
                          "--layers", "air:4,studio:27", "--dry-run"])
        one_line_error(rc, capsys.readouterr().err, "--layers air:4,studio:27", "sum to 31")


@pytest.mark.slow
def test_run_accepts_layers_and_a_manual_plan(tmp_path):
    """A real two-process pipeline on the manual split: tokens equal the whole model's."""
    pytest.importorskip("mlx.core")
    from test_runner import NEW, PROMPT, TINY, make_tiny_dir, reference_tokens

    from exo_bridge.runner.run import make_prompt

    tiny = make_tiny_dir(tmp_path / "tiny")
    plan = Plan(model={"name": "tiny-llama", "n_layers": 4, "config_hash": "x"},
                stages=[Stage("a", 0, 2), Stage("b", 2, 4)],
                workload={"prompt_tokens": PROMPT, "context_tokens": PROMPT + NEW, "streams": 1})
    p = write_plan(plan, tmp_path / "plan.json")
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.cli", "run", str(p), "--model",
                         str(tiny), "--max-tokens", str(NEW), "--layers", "b:3,a:1", "--json"],
                        capture_output=True, text=True, timeout=180)
    assert cp.returncode == 0, cp.stderr
    (res,) = json.loads(cp.stdout)["results"]
    assert res["tokens"] == reference_tokens(tiny, make_prompt(TINY["vocab_size"], PROMPT), NEW)
    assert [r["stage"] for r in res["ranks"]] == [[0, 3], [3, 4]]
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.cli", "run", str(p), "--model",
                         str(tiny), "--layers", "b:3,c:1"], capture_output=True, text=True,
                        timeout=60)
    one_line_error(cp.returncode, cp.stderr, "'c' is not in the cluster")


@pytest.mark.slow
def test_run_runs_the_optimum_a_manual_plan_records(tmp_path):
    """`exo-bridge run --stages-from optimal` runs the optimum a manual plan keeps beside its
    split (before: refused as an unknown choice); `all` runs it too; a plan without one is
    one line."""
    pytest.importorskip("mlx.core")
    from test_runner import NEW, PROMPT, TINY, make_tiny_dir, reference_tokens

    from exo_bridge.runner.run import make_prompt

    tiny = make_tiny_dir(tmp_path / "tiny")
    wl = {"prompt_tokens": PROMPT, "context_tokens": PROMPT + NEW, "streams": 1}
    opt = {"stages": [{"node": "b", "start_layer": 0, "end_layer": 1},
                      {"node": "a", "start_layer": 1, "end_layer": 4}],
           "predicted": {"tpot_s": 0.01}}
    plan = Plan(model={"name": "tiny-llama", "n_layers": 4, "config_hash": "x"},
                stages=[Stage("a", 0, 2), Stage("b", 2, 4)], workload=wl,
                baselines={"optimal": opt})
    p = write_plan(plan, tmp_path / "plan.json")
    want = reference_tokens(tiny, make_prompt(TINY["vocab_size"], PROMPT), NEW)
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.cli", "run", str(p), "--model",
                         str(tiny), "--max-tokens", str(NEW), "--stages-from", "all", "--json"],
                        capture_output=True, text=True, timeout=180)
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)["results"]
    assert [r["label"] for r in res] == ["plan", "optimal"]
    assert [r["stage"] for r in res[1]["ranks"]] == [[0, 1], [1, 4]]
    assert all(r["tokens"] == want for r in res)
    bare = write_plan(Plan(model=plan.model, stages=plan.stages, workload=wl),
                      tmp_path / "bare.json")
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.cli", "run", str(bare), "--model",
                         str(tiny), "--stages-from", "optimal"], capture_output=True, text=True,
                        timeout=60)
    one_line_error(cp.returncode, cp.stderr, "--stages-from optimal", "--layers")
