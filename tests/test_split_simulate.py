"""The discrete-event simulator agrees with the analytical cost model where both apply."""

import pytest

from graphsplit.costmodel import Workload, predict
from graphsplit.plan import Stage
from graphsplit.simulate import simulate
from test_split_solvers import scenario

STAGES = [Stage("n1", 0, 2), Stage("n3", 2, 4), Stage("n0", 4, 6)]


@pytest.mark.parametrize("RT", ["mlx-pipeline", "exo-legacy", "exo-current"])
def test_one_stream_matches_ttft_and_tpot_exactly(RT):
    c = scenario("many")
    w = Workload(prompt_tokens=64, context_tokens=256, streams=1)
    p, s = predict(c, STAGES, w, RT), simulate(c, STAGES, w, RT, new_tokens=20)
    assert s.ttft_s == pytest.approx(p.ttft_s, rel=1e-9)
    assert s.tpot_s == pytest.approx(p.tpot_s, rel=1e-9)
    assert s.throughput_tps == pytest.approx(p.throughput_tps, rel=1e-6)


@pytest.mark.parametrize("streams", [2, 3, 8])
def test_many_streams_reach_the_predicted_throughput(streams):
    c = scenario("many")
    w = Workload(prompt_tokens=64, context_tokens=256, streams=streams)
    p, s = predict(c, STAGES, w, "mlx-pipeline"), simulate(c, STAGES, w, "mlx-pipeline",
                                                     new_tokens=200)
    assert s.throughput_tps == pytest.approx(p.throughput_tps, rel=0.02)
    # the bottleneck stage is the busiest node
    busiest = max(s.busy, key=s.busy.get)
    assert busiest == max(p.stage_compute_s, key=lambda n: p.stage_compute_s[n]
                          + p.stage_link_s[n])


def test_single_node_plan_and_poisson_arrivals():
    c = scenario("big-fast")
    w = Workload(prompt_tokens=64, context_tokens=256, streams=2)
    st = [Stage("big", 0, 6)]
    s = simulate(c, st, w, requests=6, new_tokens=5, arrival_rate=2.0, seed=1)
    assert s.requests == 6 and 0 < s.utilisation["big"] <= 1
    assert s.ttft_s >= predict(c, st, w).ttft_s - 1e-12


def test_exo_current_serves_one_step_at_a_time():
    c = scenario("many")
    w = Workload(prompt_tokens=64, context_tokens=256, streams=4)
    p, s = predict(c, STAGES, w, "exo-current"), simulate(c, STAGES, w, "exo-current",
                                                         new_tokens=50)
    assert s.throughput_tps == pytest.approx(1 / p.tpot_s, rel=0.02) == p.throughput_tps
