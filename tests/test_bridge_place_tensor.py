"""`exo-bridge place` of tensor plans against tests/exo_server.py (exo's Tensor placement and
POST /instance as exo's handlers do them): a single equal-share tensor group becomes exo's
Tensor instance; what exo cannot run is refused in one line before anything is posted."""

from __future__ import annotations

import json

import pytest

from exo_server import GIB, ExoServer, FakeNode, check_runnable, model_card
from graphsplit.hybrid.shares import tensor_stage
from graphsplit.plan import Plan, Stage, write_plan
from test_bridge_place import MODEL, one_error_line, place, three_nodes

HIDDEN, INTER = 4096, 14336


def tensor_plan(tmp_path, stages, kv=8, mem=None, name="plan.json"):
    members = [m for s in stages for m in s.members]
    plan = Plan(model={"name": "llama", "n_layers": 32, "config_hash": "sha256:x",
                       "repo_id": MODEL, "n_kv_heads": kv, "intermediate_size": INTER},
                stages=stages, runtime="exo-current",
                predicted={"tpot_s": 0.03, "ttft_s": 0.5, "throughput_tps": 30.0,
                           "stage_memory_bytes": mem or {m: 2 * GIB for m in members}},
                nodes={m: {"memory_bytes": 12 * GIB} for m in members})
    return write_plan(plan, tmp_path / name)


@pytest.fixture
def server():
    with ExoServer(three_nodes(), keepalive_s=0.05, apply_delay_s=0.05) as srv:
        yield srv


@pytest.mark.parametrize("order", [["studio", "mini"], ["mini", "studio"]])
def test_equal_tensor_group_posts_exo_tensor_instance(tmp_path, server, order):
    plan = tensor_plan(tmp_path, [tensor_stage(order, [4, 4], 0, 32, INTER)])
    rc, out, err = place("--plan", str(plan), "--api", server.url, "--model", MODEL)
    assert rc == 0, err
    assert "(2 ranks), ready" in out and "Tensor preview" in err
    posted, = server.state.posted
    (tag, body), = posted.items()
    ranks = check_runnable(posted, server.state)  # what exo's Tensor loader relies on
    assert [r[1] for r in ranks] == [f"id-{n}" for n in order]  # the plan's rank order
    assert all((a, b) == (0, 32) for _, _, a, b in ranks)
    shards = body["shardAssignments"]["runnerToShard"].values()
    assert all(list(s) == ["TensorShardMetadata"] for s in shards)


def test_tensor_instance_built_from_state_when_no_preview_covers_the_group(tmp_path):
    nodes = [FakeNode("id-studio", "studio", 8 * GIB, 3 * GIB, "10.0.0.1"),
             FakeNode("id-mini", "mini", 8 * GIB, 1 * GIB, "10.0.0.2"),
             FakeNode("id-air", "air", 64 * GIB, 48 * GIB, "10.0.0.3")]
    with ExoServer(nodes, keepalive_s=0.05) as srv:  # studio + mini hold less than 4.32 GiB
        plan = tensor_plan(tmp_path, [tensor_stage(["mini", "studio"], [4, 4], 0, 32, INTER)])
        rc, out, err = place("--plan", str(plan), "--api", srv.url, "--model", MODEL,
                             "--dry-run", "--skip-memory-check")
        assert rc == 0, err
        assert "built from exo's state" in err
        inst = json.loads(out)
        assert [r[1] for r in check_runnable(inst, srv.state)] == ["id-mini", "id-studio"]
        srv.state.create({"instance": inst})  # exo's POST /instance accepts it (total memory)
        assert srv.state.posted == [inst]


@pytest.mark.parametrize("stages, words", [
    ([tensor_stage(["studio", "mini"], [4, 4], 0, 20, INTER), Stage("air", 20, 32)],
     "inside a pipeline"),
    ([tensor_stage(["studio", "mini"], [6, 2], 0, 32, INTER)], "unequal shares [6, 2]"),
])
def test_hybrid_or_unequal_plan_refused_before_asking_exo(tmp_path, server, stages, words):
    rc, _, err = place("--plan", str(tensor_plan(tmp_path, stages)), "--api", server.url,
                       "--model", MODEL)
    line = one_error_line(err)
    assert rc == 2 and words in line and "exo-bridge run" in line
    assert server.state.requests == [] and server.state.posted == []


def test_group_size_exo_cannot_cut_is_refused_with_exos_reason(tmp_path):
    card = model_card(MODEL, 32, 4_637_851_648, 4096, kv_heads=6)  # 6 heads, hidden 4096
    with ExoServer(three_nodes(), cards={MODEL: card}, keepalive_s=0.05) as srv:
        plan = tensor_plan(tmp_path, [tensor_stage(["studio", "mini", "air"], [2, 2, 2], 0, 32,
                                                   INTER)], kv=6)
        rc, _, err = place("--plan", str(plan), "--api", srv.url, "--model", MODEL)
        line = one_error_line(err)
        assert rc == 2 and "hidden_size=4096" in line and "exo-bridge run" in line
        assert srv.state.posted == []


def test_measured_memory_of_each_member_is_checked(tmp_path, server):
    plan = tensor_plan(tmp_path, [tensor_stage(["studio", "mini"], [4, 4], 0, 32, INTER)],
                       mem={"studio": 2 * GIB, "mini": 13 * GIB})  # mini has 12 available
    rc, _, err = place("--plan", str(plan), "--api", server.url, "--model", MODEL)
    line = one_error_line(err)
    assert rc == 2 and "mini (id-mini) needs 13.00 GiB" in line
    assert server.state.posted == []


def test_fake_exo_tensor_runnable_check_is_exos_loader_rule():
    """The test exo's `check_runnable` refuses a Tensor instance exo's loader could not cut
    (3 ranks of 8 KV heads), which exo's POST /instance itself accepts."""
    from exo_bridge.exo_current import schema
    from exo_server import ExoState

    st = ExoState(three_nodes(), cards={MODEL: model_card(MODEL, 32, 4_637_851_648, 4096)})
    card = schema.parse_card(st.cards[MODEL])
    topo = schema.Topology(["id-studio", "id-mini", "id-air"],
                           {(a, b): [f"10.0.0.{i + 1}"] for a in ("id-studio", "id-mini", "id-air")
                            for i, b in enumerate(("id-studio", "id-mini", "id-air")) if a != b},
                           {}, {})
    ranks = [schema.Rank(n, 0, 32) for n in ("id-studio", "id-mini", "id-air")]
    inst = schema.build_instance("MlxRingInstance", card, ranks, topo, 50000,
                                 shard_tag=schema.TENSOR_SHARD)
    st.create({"instance": inst})  # accepted: exo checks the total memory only
    with pytest.raises(AssertionError, match="not divisible by 3 ranks"):
        check_runnable(inst, st)
    assert [r[1] for r in check_runnable(schema.build_instance(
        "MlxRingInstance", card, ranks[:2], topo, 50000, shard_tag=schema.TENSOR_SHARD), st)
            ] == ["id-studio", "id-mini"]


def test_legacy_exo_strategy_refuses_a_tensor_plan(tmp_path):
    """Legacy exo's strategy (stand-alone, inside exo's process) would run the group's first
    node alone over the group's layers: it refuses instead, naming `exo-bridge run`."""
    from exo_bridge.exo_legacy.strategy import StrategyError, read_plan_view

    p = tensor_plan(tmp_path, [tensor_stage(["studio", "mini"], [4, 4], 0, 32, INTER)])
    with pytest.raises(StrategyError, match="stage 0 is tensor-parallel.*exo-bridge run"):
        read_plan_view(str(p))
    data = json.loads(p.read_text())
    del data["stages"][0]["tensor"]
    data["stages"][0]["end_layer"] = 32
    assert read_plan_view(data).stages[0].node == "studio"
