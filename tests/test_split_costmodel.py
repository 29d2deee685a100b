"""Unit tests of the splitter's cost model, cluster file and baselines (synthetic tables)."""

import json

import pytest

from costtables import GiB, MiB, make_table, write_cluster
from graphsplit.baselines import (even_stages, exo_current_partition, exo_current_stages,
                                  exo_legacy_partition, exo_legacy_stages, largest_remainder)
from graphsplit.cluster import ClusterError, cluster_from_tables, load_cluster
from graphsplit.costmodel import ChainCosts, Workload, predict, stage_memory
from graphsplit.plan import Stage


def two_nodes(**kw):
    a = make_table("a", 4, decode_s=0.01, weight_bytes=100 * MiB, **kw)
    b = make_table("b", 4, decode_s=0.02, weight_bytes=100 * MiB, **kw)
    return cluster_from_tables({"a": a, "b": b}, links={
        ("a", "b"): {"latency_ms": 1.0, "bandwidth_gbps": 8.0},
        ("b", "a"): {"latency_ms": 3.0, "bandwidth_gbps": 8.0}})


def test_tpot_is_sum_of_stage_compute_links_and_ring_closure():
    c = two_nodes()
    w = Workload(prompt_tokens=64, context_tokens=128, streams=1)
    st = [Stage("a", 0, 3), Stage("b", 3, 4)]
    p = predict(c, st, w, "mlx-pipeline")
    # decode at context 128 is the first grid point: 0.01 per block on a, 0.02 on b
    comp_a = 3 * 0.01 + 0.001  # + embed
    comp_b = 1 * 0.02 + 0.002  # + head
    link_ab = 1e-3 + 8192 / 1e9  # 8 Gbit/s = 1e9 B/s
    close_ba = 3e-3 + 4 / 1e9
    assert p.tpot_s == pytest.approx(comp_a + comp_b + link_ab + close_ba, rel=1e-12)
    assert p.bottleneck_s == pytest.approx(max(comp_a + link_ab, comp_b + close_ba))
    assert p.throughput_tps == pytest.approx(1 / p.tpot_s)
    # ttft: prefill 0.5 x decode per token x 64 tokens, 64 tokens of activations cross the link
    pf = 64 * (3 * 0.005 + 0.0005) + 64 * (0.01 + 0.001)
    assert p.ttft_s == pytest.approx(pf + 1e-3 + 64 * 8192 / 1e9 + close_ba, rel=1e-12)


def test_throughput_bounded_by_streams_and_bottleneck():
    c = two_nodes()
    st = [Stage("a", 0, 2), Stage("b", 2, 4)]
    p1 = predict(c, st, Workload(streams=1), "mlx-pipeline")
    p8 = predict(c, st, Workload(streams=8), "mlx-pipeline")
    assert p1.throughput_tps == pytest.approx(1 / p1.tpot_s)
    assert p8.throughput_tps == pytest.approx(1 / p8.bottleneck_s)


def test_single_stage_has_no_links():
    c = two_nodes()
    p = predict(c, [Stage("a", 0, 4)], Workload(context_tokens=128))
    assert p.tpot_s == pytest.approx(4 * 0.01 + 0.001 + 0.002)
    assert p.stage_link_s == {"a": 0.0}


def test_memory_by_runtime():
    c = two_nodes()
    w = Workload(prompt_tokens=16, context_tokens=1000, streams=2)
    node = c.node("a")
    kv = 1000 * 2 * 4096 * 2
    buf = 8 * MiB
    first = stage_memory(node, 0, 2, w, "exo-legacy", True, False)
    assert first == 2 * 100 * MiB + kv + buf + 200 * MiB  # embedding only
    mid_cur = stage_memory(node, 2, 4, w, "exo-current", False, True)
    assert mid_cur == 2 * 100 * MiB + kv + buf + 400 * MiB  # embedding + head on every rank
    last_leg = stage_memory(node, 2, 4, w, "exo-legacy", False, True)
    assert last_leg == 2 * 100 * MiB + kv + buf + 200 * MiB  # head only


def test_shortfall_reported():
    c = cluster_from_tables({"a": make_table("a", 4, weight_bytes=1 * GiB, memory_usable=2 * GiB)})
    p = predict(c, [Stage("a", 0, 4)], Workload())
    assert not p.fits and p.shortfalls["a"] > 2 * GiB


def test_dense_costs_match_predict():
    c = two_nodes()
    w = Workload(context_tokens=500, streams=3)
    for rt in ("exo-current", "exo-legacy", "mlx-pipeline"):
        cc = ChainCosts(c, w, rt)
        a, b = cc.ids.index("a"), cc.ids.index("b")
        p = predict(c, [Stage("b", 0, 1), Stage("a", 1, 4)], w, rt)
        t0 = cc.comp[b, 0, 1] + cc.out[b, a, 1]
        t1 = cc.comp[a, 1, 4] + cc.close[a, b]
        pace = max(cc.pace[a], cc.pace[b])  # exo-current: the slowest head; else 0
        assert t0 + t1 + pace == pytest.approx(p.tpot_s, rel=1e-12)
        assert cc.mem[a, 1, 4] == pytest.approx(p.stage_memory_bytes["a"])


def heads_differ(**kw):
    """a: head 0.002 s, b: head 0.006 s per decode token (b's LM head is slower)."""
    a = make_table("a", 4, decode_s=0.01, weight_bytes=100 * MiB, head_decode_s=0.002, **kw)
    b = make_table("b", 4, decode_s=0.02, weight_bytes=100 * MiB, head_decode_s=0.006, **kw)
    return cluster_from_tables({"a": a, "b": b}, links={
        ("a", "b"): {"latency_ms": 1.0, "bandwidth_gbps": 8.0},
        ("b", "a"): {"latency_ms": 3.0, "bandwidth_gbps": 8.0}})


def test_exo_current_protocol_terms():
    """exo-current: activation a -> b, the last hidden state all-gathered back (hop b -> a),
    no token closure, the head on every rank (the slowest sets the pace)."""
    c = heads_differ()
    P, C = 64, 128
    w = Workload(prompt_tokens=P, context_tokens=C)
    p = predict(c, [Stage("a", 0, 3), Stage("b", 3, 4)], w, "exo-current")
    comp_a, comp_b = 3 * 0.01 + 0.001, 1 * 0.02  # embed on a; no head in any stage
    fwd, back = 1e-3 + 8192 / 1e9, 3e-3 + 8192 / 1e9
    assert p.tpot_s == pytest.approx(comp_a + comp_b + fwd + back + 0.006, rel=1e-12)
    assert p.head_pace_s == pytest.approx(0.006) and p.gather_s == pytest.approx(back)
    assert p.bottleneck_s == p.tpot_s and p.throughput_tps == pytest.approx(1 / p.tpot_s)
    # ttft: prompt[:-1] through the pipeline, prompt[-1] (no gather), then two decode steps
    # with the gather (the runtime trims 2 and re-decodes); head pace max(hp(P-1) + 3 hd)
    Q = P - 1
    pre = Q * (3 * 0.005 + 0.0005) + Q * 0.01 + (1e-3 + Q * 8192 / 1e9)
    one = comp_a + comp_b + fwd
    pace = max(Q * 0.001 + 3 * 0.002, Q * 0.003 + 3 * 0.006)
    assert p.ttft_s == pytest.approx(pre + one + 2 * (one + back) + pace, rel=1e-12)


def test_exo_legacy_message_overhead_from_the_cluster_file(tmp_path):
    c = heads_differ()
    st = [Stage("a", 0, 3), Stage("b", 3, 4)]
    w = Workload(prompt_tokens=64, context_tokens=128)
    ours = predict(c, st, w, "mlx-pipeline")
    assert predict(c, st, w, "exo-legacy").tpot_s == pytest.approx(ours.tpot_s)  # unmeasured: 0
    c.runtimes = {"exo-legacy": {"message_overhead_ms": 0.5}}
    leg = predict(c, st, w, "exo-legacy")
    # two messages per token (activation, token id back), each + 0.5 ms
    assert leg.tpot_s == pytest.approx(ours.tpot_s + 2 * 0.5e-3, rel=1e-12)
    assert leg.ttft_s == pytest.approx(ours.ttft_s + 2 * 0.5e-3, rel=1e-12)
    assert leg.message_overhead_s == pytest.approx(0.5e-3)


def test_runtimes_section_is_read_and_checked(tmp_path):
    path = write_cluster(tmp_path, {"a": make_table("a", 4)})
    data = json.loads(path.read_text())
    data["runtimes"] = {"exo-legacy": {"message_overhead_ms": 0.25, "source": "measured"}}
    path.write_text(json.dumps(data))
    assert load_cluster(path).runtimes["exo-legacy"]["message_overhead_ms"] == 0.25
    data["runtimes"] = {"exo-legacy": {"message_overhead_ms": -1}}
    path.write_text(json.dumps(data))
    with pytest.raises(ClusterError, match="message_overhead_ms"):
        load_cluster(path)


# -- baselines -------------------------------------------------------------------------------

def test_exo_legacy_truncation_and_order():
    # sorted by memory desc: b (3), a (1) -> b gets [0, .75), a [.75, 1)
    st = exo_legacy_partition([("a", 1), ("b", 3)], 32)
    assert st == [Stage("b", 0, 24), Stage("a", 24, 32)]
    # ties by node id, descending
    st = exo_legacy_partition([("a", 1), ("b", 1), ("c", 1)], 10)
    assert [s.node for s in st] == ["c", "b", "a"]
    assert st == [Stage("c", 0, 3), Stage("b", 3, 6), Stage("a", 6, 10)]
    # a middle node whose fraction truncates to nothing is dropped; the last is forced to n-1
    st = exo_legacy_partition([("a", 10), ("b", 1), ("c", 1)], 4)
    assert st == [Stage("a", 0, 3), Stage("b", 3, 4)]


def test_exo_current_largest_remainder():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]  # tie -> earlier node
    assert largest_remainder(10, [100, 1]) == [9, 1]  # every node >= 1 layer
    st = exo_current_partition([("x", 3), ("y", 1)], 32)
    assert st == [Stage("x", 0, 24), Stage("y", 24, 32)]


def test_baselines_on_cluster():
    t = {n: make_table(n, 8, weight_bytes=100 * MiB, memory_usable=m * GiB, memory_total=2 * m * GiB)
         for n, m in (("a", 4), ("b", 1))}
    c = cluster_from_tables(t)
    assert exo_legacy_stages(c)[0].node == "a"
    # exo-current: node a alone holds the model (smallest cycle)
    assert exo_current_stages(c) == [Stage("a", 0, 8)]
    assert even_stages(c) == [Stage("a", 0, 4), Stage("b", 4, 8)]


# -- cluster files ---------------------------------------------------------------------------

def test_cluster_file_links_memory_and_chip(tmp_path):
    t = {"s": make_table("s", 4, bandwidth_gbs=100, tflops=10),
         "m": make_table("m", 4)}
    p = write_cluster(tmp_path, t, links=[{"from": "s", "to": "m", "latency_ms": 0.5,
                                           "bandwidth_gbps": 40}],
                      default_link={"latency_ms": 2, "bandwidth_gbps": 1},
                      node_fields={"m": {"memory_bytes": 5 * GiB}},
                      extra_nodes=[{"id": "u", "derive_from": "s",
                                    "chip": {"memory_bandwidth_gbs": 400, "fp16_tflops": 40,
                                             "memory_bytes": 64 * GiB}}])
    c = load_cluster(p)
    assert c.ids == ["s", "m", "u"] and c.n_layers == 4
    assert c.link("s", "m").latency_s == pytest.approx(0.5e-3)
    assert c.link("s", "m").bandwidth_Bps == pytest.approx(5e9)
    assert c.link("m", "s").latency_s == pytest.approx(2e-3)  # directed: default the other way
    assert c.node("m").memory_bytes == 5 * GiB
    u = c.node("u")
    assert u.estimated and not c.node("s").estimated
    ts, tu = c.node("s").table, u.table
    r = ts.row("layers.0")
    # the chip's own roofline (graphsplit.roofline), not s's times scaled: weights and the KV
    # at the first context over 400 GB/s at the GEMV (and attention) efficiency, plus the
    # per-block overhead
    from graphsplit.roofline import BLOCK_OVERHEAD_S, GEMV_BW_EFFICIENCY, SDPA_BW_EFFICIENCY
    rate = 400e9 * GEMV_BW_EFFICIENCY
    want = (r.weight_bytes + r.kv_bytes_per_token * tu.decode_context[0] / SDPA_BW_EFFICIENCY
            ) / rate + BLOCK_OVERHEAD_S
    assert tu.row("layers.0").decode_s[0] == pytest.approx(want)
    assert u.total_bytes == 64 * GiB


def test_cluster_refuses_mixed_models(tmp_path):
    t = {"a": make_table("a", 4), "b": make_table("b", 4, config_hash="sha256:other")}
    p = write_cluster(tmp_path, t)
    with pytest.raises(ClusterError, match="same model"):
        load_cluster(p)


@pytest.mark.parametrize("data,msg", [
    ({"nodes": []}, "non-empty"),
    ({"nodes": [{"id": "a"}]}, "exactly one of"),
    ({"nodes": [{"id": "a", "profile": "nope.json"}]}, "does not exist"),
    ({"nodes": [{"id": "a", "chip": {"memory_bandwidth_gbs": 1}, "derive_from": "z"}]},
     "derive_from"),
])
def test_bad_cluster_files(tmp_path, data, msg):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ClusterError, match=msg):
        load_cluster(p)
