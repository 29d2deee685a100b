"""Many streams for real: B concurrent streams through a pipeline of real mx.distributed
processes (ring backend over loopback) under each runtime batching pattern.

The check is exact: every stream's greedy tokens equal a single-process, single-stream greedy
generation of the same prompt (float32, tiny llama). No timing is asserted; the measured numbers
are only checked to exist and be consistent with the arrival times they come from.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

mx = pytest.importorskip("mlx.core")

from exo_bridge.runner.run import serve_stages, model_spec  # noqa: E402
from exo_bridge.runner.streams import steady_decode, stream_prompts, waves  # noqa: E402
from graphsplit.plan import Stage  # noqa: E402
from tests.test_runner import TINY, make_tiny_dir, reference_tokens  # noqa: E402

PROMPT, NEW = 10, 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dir(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def want(tiny):
    """Single-process single-stream greedy tokens of each of the 4 streams' prompts."""
    return [reference_tokens(tiny, p, NEW) for p in stream_prompts(TINY["vocab_size"], PROMPT, 4)]


def test_schedule_shapes():
    assert waves(5, "micro-batch", 2, 8) == [[[0, 1], [2, 3], [4]]]
    assert waves(5, "batch-through", 2, 2) == [[[0, 1]], [[2, 3]], [[4]]]
    assert waves(3, "batch-through", 1, 8) == [[[0, 1, 2]]]
    # steady decoding of two staggered micro-batches, one token per second each: exactly 2/s
    # (the first stream's wait for the second one's prefill is not counted)
    times = [[1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5]]
    assert steady_decode(times, [[[0], [1]]]) == (5, 2.5)
    assert steady_decode([[0.0, 9.0], [1.0, 2.0]], [[[0], [1]]]) == (1, 1.0)
    assert steady_decode([[5.0, 6.0], [7.0, 8.0]], [[[0]], [[1]]]) == (2, 2.0)  # two waves
    ps = stream_prompts(256, PROMPT, 4)
    assert len({tuple(p) for p in ps}) == 4 and all(len(p) == PROMPT for p in ps)


@pytest.mark.slow
@pytest.mark.parametrize("pattern, protocol, streams, m, max_batch, stages", [
    ("micro-batch", "ring", 3, 2, 8, [("a", 0, 1), ("b", 1, 3), ("c", 3, 4)]),
    ("micro-batch", "exo-legacy", 4, 2, 8, [("a", 0, 2), ("b", 2, 4)]),
    ("batch-through", "ring", 3, 1, 2, [("a", 0, 1), ("b", 1, 4)]),
    ("batch-through", "exo-current", 4, 1, 8, [("a", 0, 1), ("b", 1, 3), ("c", 3, 4)]),
    ("micro-batch", "ring", 3, 2, 8, [("a", 0, 4)]),  # one rank: samples its own tokens
])
def test_every_stream_gets_the_single_stream_tokens(tiny, want, pattern, protocol, streams,
                                                    m, max_batch, stages):
    spec = model_spec(str(tiny), None)
    res = serve_stages([Stage(*s) for s in stages], spec, PROMPT, NEW, streams,
                       pattern=pattern, micro_batch=m, max_batch=max_batch, protocol=protocol,
                       timeout_s=240)
    assert res.tokens == want[:streams]
    assert len({tuple(t) for t in res.tokens}) > 1  # distinct prompts, distinct answers
    meas = res.measured()
    for t in res.times_s:  # arrival times strictly ordered per stream
        assert len(t) == NEW and all(a < b for a, b in zip(t, t[1:]))
    assert meas["ttft_s"] == statistics.median(meas["per_stream_ttft_s"])
    assert meas["throughput_tps"] > 0 and meas["tpot_s"] > 0
    # each rank ran every (micro-)batch: per stage, passes by batch size
    sizes = sorted(len(mb) for wave in res.schedule for mb in wave)
    for rk in res.ranks:
        decode = sorted(b for ph, b, *_ in rk["passes"] if ph == "decode")
        assert decode == sorted(sizes * (NEW - 1))
    if protocol == "exo-current":  # every rank samples the same ids from the gathered state
        assert all([s["tokens"] for s in rk["streams"]] == want[:streams] for rk in res.ranks)


def _plan(tmp_path, serving=None):
    from graphsplit.plan import Plan, write_plan

    plan = Plan(model={"name": "tiny-llama", "n_layers": 4, "config_hash": "x"},
                stages=[Stage("a", 0, 2), Stage("b", 2, 4)], runtime="mlx-pipeline",
                workload={"prompt_tokens": PROMPT, "streams": 3})
    p = write_plan(plan, tmp_path / "plan.json")
    if serving:  # servemodel's section (INTERFACES I5), as split-model will write it
        d = json.loads(p.read_text())
        d["serving"] = serving
        p.write_text(json.dumps(d))
    return p


@pytest.mark.slow
def test_cli_takes_the_plans_serving_section_and_prints_the_table(tiny, want, tmp_path):
    p = _plan(tmp_path, {"pattern": "batch-through", "micro_batch": 2, "max_batch": 2,
                         "why": "exo's ExoBatchGenerator"})
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.runner", str(p), "--model", str(tiny),
                         "--max-tokens", str(NEW), "--json"] + ["--streams", "3"],
                        capture_output=True, text=True, timeout=240)
    assert cp.returncode == 0, cp.stderr
    r = json.loads(cp.stdout)["results"][0]
    assert (r["pattern"], r["max_batch"], r["streams"]) == ("batch-through", 2, 3)
    assert r["tokens"] == want[:3]
    assert r["measured"]["throughput_tps"] > 0 and r["error_pct"]["throughput_tps"] is None
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.runner", str(p), "--model", str(tiny),
                         "--max-tokens", "2", "--pattern", "micro-batch"],
                        capture_output=True, text=True, timeout=240)
    assert cp.returncode == 0, cp.stderr
    assert "micro-batch@ring" in cp.stdout and "tok/s" in cp.stdout  # the rich table


@pytest.mark.parametrize("extra, says", [
    (["--pattern", "micro-batch", "--protocol", "exo-current"], "barrier"),
    (["--streams", "0"], "--streams"),
    (["--micro-batch", "-1"], "--micro-batch"),
])
def test_bad_serving_options_are_one_line(tiny, tmp_path, extra, says):
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.runner", str(_plan(tmp_path)),
                         "--model", str(tiny)] + extra, capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 2
    err = cp.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and says in err, err


def test_bad_plan_serving_section_is_one_line(tiny, tmp_path):
    p = _plan(tmp_path, {"pattern": "pipelined", "micro_batch": 2})
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.runner", str(p), "--model", str(tiny),
                         "--streams", "2"], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and "serving.pattern" in cp.stderr and \
        cp.stderr.strip().count("\n") == 0, cp.stderr
