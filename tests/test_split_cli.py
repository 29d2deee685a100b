"""split-model end to end: real files, a real subprocess; bad input is one line, exit 2."""

import json
import subprocess
import sys

import pytest

from costtables import GiB, MiB, make_table, write_cluster
from graphsplit.plan import read_plan

CMD = [sys.executable, "-c", "import sys; from graphsplit.cli import main; sys.exit(main())"]


def run(*args):
    return subprocess.run(CMD + [str(a) for a in args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def cluster(tmp_path):
    t = {"studio": make_table("studio", 8, decode_s=0.004, memory_usable=4 * GiB),
         "mini": make_table("mini", 8, decode_s=0.012, memory_usable=1 * GiB),
         "air": make_table("air", 8, decode_s=0.02, memory_usable=1 * GiB)}
    return write_cluster(tmp_path, t, links=[{"from": "studio", "to": "mini", "latency_ms": 0.2,
                                              "bandwidth_gbps": 40, "both_ways": True}],
                         default_link={"latency_ms": 2.0, "bandwidth_gbps": 1.0},
                         extra_nodes=[{"id": "ultra", "derive_from": "studio",
                                       "chip": {"memory_bandwidth_gbs": 400, "fp16_tflops": 40,
                                                "memory_bytes": 2 * GiB}}])


def test_plan_table_predictions_and_baselines(cluster):
    r = run(cluster, "--objective", "latency")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "all times predicted from measured cost tables" in out
    for name in ("ours", "exo-legacy", "exo-current", "even", "ultra*", "proven optimal"):
        assert name in out


@pytest.mark.parametrize("objective", ["latency", "ttft", "throughput", "pareto"])
def test_json_plan(cluster, tmp_path, objective):
    out = tmp_path / "plan.json"
    r = run(cluster, "--objective", objective, "--streams", "4", "--json", "--out", out)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["objective"] == objective and d["solver"]["optimal"] is True
    st = d["stages"]
    assert st[0]["start_layer"] == 0 and st[-1]["end_layer"] == 8
    assert all(set(s) == {"node", "start_layer", "end_layer"} for s in st)
    for k in ("tpot_s", "ttft_s", "throughput_tps", "stage_memory_bytes"):
        assert k in d["predicted"]
    assert set(d["baselines"]) == {"exo-legacy", "exo-current", "exo-current-tensor", "even"}
    for name, b in d["baselines"].items():
        if name == "exo-current-tensor":  # these tables have no tensor-parallel profile
            assert "tensor_parallel" in b["error"] or "exo would refuse" in b["error"]
            continue
        assert "tpot_s" in b["predicted"]
    assert d["nodes"]["ultra"]["estimated"] is True
    plan = read_plan(out)
    assert [s.node for s in plan.stages] == [s["node"] for s in st]
    if objective == "pareto":
        assert len(d["predicted"]["pareto"]) >= 1


def test_shuffled_node_order_gives_the_same_plan(tmp_path):
    t = {n: make_table(n, 8, decode_s=d, memory_usable=700 * MiB)
         for n, d in (("a", 0.01), ("b", 0.01), ("c", 0.015), ("d", 0.01))}
    p1 = write_cluster(tmp_path / "x", t, order=["a", "b", "c", "d"])
    p2 = write_cluster(tmp_path / "y", t, order=["d", "c", "b", "a"])
    for obj in ("latency", "throughput"):
        r1, r2 = run(p1, "--objective", obj, "--json"), run(p2, "--objective", obj, "--json")
        assert json.loads(r1.stdout)["stages"] == json.loads(r2.stdout)["stages"]


def test_plot_and_simulate(cluster, tmp_path):
    png = tmp_path / "plan.png"
    r = run(cluster, "--plot", png, "--simulate", "--streams", "2")
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "simulated" in r.stdout


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_files(tmp_path, cluster):
    one_line_error(run(tmp_path / "missing.json"), "no such file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_line_error(run(bad), "not valid JSON")
    bad.write_text(json.dumps({"nodes": [{"id": "a", "profile": "nowhere.json"}]}))
    one_line_error(run(bad), "does not exist")
    bad.write_text(json.dumps([1, 2]))
    one_line_error(run(bad), "JSON object")
    prof = tmp_path / "profiles" / "broken.json"
    prof.parent.mkdir(exist_ok=True)
    prof.write_text(json.dumps({"format": "something-else"}))
    bad.write_text(json.dumps({"nodes": [{"id": "a", "profile": "profiles/broken.json"}]}))
    one_line_error(run(bad), "cost table")
    one_line_error(run(cluster, "--objective", "fastest"), "invalid choice")
    one_line_error(run(cluster, "--streams", "0"), "streams")


def test_mixed_models_refused(tmp_path):
    t = {"a": make_table("a", 8), "b": make_table("b", 8, config_hash="sha256:other")}
    one_line_error(run(write_cluster(tmp_path, t)), "same model")


def test_model_that_does_not_fit_names_the_nodes(tmp_path):
    t = {"a": make_table("a", 8, weight_bytes=1 * GiB, memory_usable=3 * GiB),
         "b": make_table("b", 8, weight_bytes=1 * GiB, memory_usable=2 * GiB)}
    r = run(write_cluster(tmp_path, t))
    one_line_error(r, "does not fit", "a short by", "b short by")


def test_unknown_plot_format_is_refused_before_the_plan_is_written(cluster, tmp_path):
    """--plot with a suffix matplotlib cannot write: one line, exit 2, and --out untouched
    (before: the plan was written, then the plot failed)."""
    out = tmp_path / "plan.json"
    out.write_text("the user's old plan\n")
    r = run(cluster, "--plot", tmp_path / "plan.xyz", "--out", out)
    one_line_error(r, "--plot", ".xyz")
    assert out.read_text() == "the user's old plan\n"
    assert not (tmp_path / "plan.xyz").exists()
