"""exo_current.schema: exo's JSON parsed, rewritten to a measured split, built from state (no
HTTP: the shapes come from tests/exo_server.py, written from exo's source)."""

from __future__ import annotations

import itertools
import json

import pytest

from exo_bridge.exo_current import schema
from exo_bridge.exo_current.schema import ExoSchemaError, Rank
from exo_server import (GIB, MODEL_CARDS, ExoState, FakeNode, check_runnable, model_card,
                        to_snake_keys)
from profiler.errors import UserError

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"  # 16 layers


def state(n=4, **kw) -> ExoState:
    nodes = [FakeNode(f"n{i}", f"host{i}", 16 * GIB, 8 * GIB, f"10.0.0.{i + 1}")
             for i in range(n)]
    return ExoState(nodes=nodes, cards={m: model_card(m, *v) for m, v in MODEL_CARDS.items()},
                    **kw)


def test_parse_camel_and_snake_agree():
    st = state(3)
    inst = st.place(st.cards[MODEL], "Pipeline", "MlxRing", 3)
    a = schema.parse_instance(inst)
    b = schema.parse_instance(to_snake_keys(inst))
    assert schema.instance_summary(a) == schema.instance_summary(b)
    assert a.n_layers == 16 and a.model_id == MODEL
    assert a.storage_bytes() == MODEL_CARDS[MODEL][1]
    assert schema.parse_instance({"instance": inst}).instance_id == a.instance_id


def test_every_ring_order_of_four_nodes_is_accepted():
    """Any rank order (and any subset of 2..4 nodes) re-indexes the ring's hosts consistently."""
    st = state(4)
    view = schema.parse_instance(st.place(st.cards[MODEL], "Pipeline", "MlxRing", 4))
    for k in (2, 3, 4):
        for order in itertools.permutations(["n0", "n1", "n2", "n3"], k):
            cuts = [round(16 * i / k) for i in range(k + 1)]
            ranks = [Rank(order[i], cuts[i], cuts[i + 1]) for i in range(k)]
            inst = schema.rewrite_instance(view, ranks)
            check_runnable(inst, st)
            hbn = inst["MlxRingInstance"]["hostsByNode"]
            ip = {n: f"10.0.0.{int(n[1]) + 1}" for n in order}
            for r, u in enumerate(order):
                assert hbn[u][r]["ip"] == "0.0.0.0"
                for nb in {(r - 1) % k, (r + 1) % k} - {r}:
                    assert hbn[u][nb]["ip"] == ip[order[nb]], (order, u, nb)


def test_jaccl_matrix_reindexed_and_rank0_kept():
    st = state(3, rdma=True)
    view = schema.parse_instance(st.place(st.cards[MODEL], "Pipeline", "MlxJaccl", 3))
    inst = schema.rewrite_instance(view, [Rank("n0", 0, 4), Rank("n2", 4, 10),
                                           Rank("n1", 10, 16)])
    check_runnable(inst, st)
    m = inst["MlxJacclInstance"]["jacclDevices"]
    assert m[1][2] == "rdma_en1" and m[2][1] == "rdma_en2" and m[0][0] is None
    with pytest.raises(UserError, match="rank 0"):
        schema.rewrite_instance(view, [Rank("n1", 0, 8), Rank("n0", 8, 16)])


def test_flat_hosts_list_reindexed():
    st = state(2)
    inst = st.place(st.cards[MODEL], "Pipeline", "MlxRing", 2)
    body = inst["MlxRingInstance"]
    del body["hostsByNode"], body["ephemeralPort"]
    body["hosts"] = [{"ip": "10.0.0.1", "port": 1}, {"ip": "10.0.0.2", "port": 2}]
    out = schema.rewrite_instance(schema.parse_instance(inst),
                                   [Rank("n1", 0, 8), Rank("n0", 8, 16)])
    assert out["MlxRingInstance"]["hosts"] == [{"ip": "10.0.0.2", "port": 2},
                                               {"ip": "10.0.0.1", "port": 1}]


@pytest.mark.parametrize("bad, needle", [
    ({}, "expected one tag"),
    ({"MlxRingInstance": {}}, "instanceId"),
    ({"MlxRingInstance": {"instanceId": "x", "shardAssignments": {"modelId": "m",
                                                                  "runnerToShard": {},
                                                                  "nodeToRunner": {}}}},
     "no shards"),
    ({"MlxRingInstance": {"instanceId": "x", "shardAssignments": {
        "modelId": "m", "runnerToShard": {"r": {"TensorShardMetadata": {}}},
        "nodeToRunner": {"n": "r"}}}}, "TensorShardMetadata"),
    ({"MlxRingInstance": {"instanceId": "x", "shardAssignments": {
        "modelId": "m", "runnerToShard": {"r": {"PipelineShardMetadata": {
            "deviceRank": "zero", "worldSize": 1, "startLayer": 0, "endLayer": 1,
            "nLayers": 1}}}, "nodeToRunner": {"n": "r"}}}}, "integers"),
])
def test_unknown_shapes_name_what_was_unexpected(bad, needle):
    with pytest.raises(ExoSchemaError, match=needle):
        schema.parse_instance(bad)


def test_planned_node_outside_placement_is_refused():
    st = state(3)
    view = schema.parse_instance(st.place(st.cards[MODEL], "Pipeline", "MlxRing", 2))
    with pytest.raises(UserError, match="n2"):
        schema.rewrite_instance(view, [Rank("n0", 0, 8), Rank("n2", 8, 16)])


def test_state_nodes():
    st = state(2)
    nodes = schema.parse_state_nodes(st.state())
    assert nodes["n1"].name == "host1" and nodes["n1"].ram_available == 8 * GIB
    assert schema.parse_state_nodes(to_snake_keys(st.state()))["n0"].ram_total == 16 * GIB


def to_list_form(inst: dict, dict_items: bool = False) -> dict:
    """The newer ShardAssignments shape: shards = [[node, runner, shard], ...] in rank order."""
    (tag, body), = inst.items()
    sa = body["shardAssignments"]
    runner_node = {r: n for n, r in sa["nodeToRunner"].items()}
    items = sorted(((runner_node[r], r, sh) for r, sh in sa["runnerToShard"].items()),
                   key=lambda x: x[2]["PipelineShardMetadata"]["deviceRank"])
    if dict_items:
        items = [{"nodeId": n, "runnerId": r, "shard": sh} for n, r, sh in items]
    else:
        items = [list(x) for x in items]
    body["shardAssignments"] = {"modelId": sa["modelId"], "shards": items,
                                "primaryOutputNode": len(items) - 1}
    return inst


@pytest.mark.parametrize("dict_items", [False, True])
def test_list_form_shard_assignments(dict_items):
    st = state(3)
    inst = to_list_form(st.place(st.cards[MODEL], "Pipeline", "MlxRing", 3), dict_items)
    view = schema.parse_instance(inst)
    assert [s.node_id for s in view.shards] == ["n0", "n1", "n2"]
    out = schema.rewrite_instance(view, [Rank("n2", 0, 5), Rank("n0", 5, 16)])
    assert schema.instance_summary(schema.parse_instance(out)) == [(0, "n2", 0, 5),
                                                                     (1, "n0", 5, 16)]
    assert out["MlxRingInstance"]["shardAssignments"]["primaryOutputNode"] == 1


def test_previews_skip_tensor_error_and_unknown_entries():
    st = state(3)
    pre = st.previews(MODEL, None)
    pre.append({"model_id": MODEL, "sharding": "Pipeline", "instance_meta": "Vllm",
                "instance": {"VllmInstance": {"instanceId": "v"}}, "error": None})
    out = schema.parse_previews({"previews": pre})
    assert len(out) == len(pre)
    used = [p for p in out if p.view is not None]
    # exo labels a one-node Tensor preview "Tensor" but shards it Pipeline (forced)
    assert used and all(s.tag == "PipelineShardMetadata" for p in used for s in p.view.shards)
    assert any(p.sharding == "Tensor" and p.skipped and "TensorShardMetadata" in p.skipped
               for p in out)
    assert any(p.view is None and p.error for p in out)  # exo's error entries
    assert schema.parse_card(next(p.card for p in out if p.sharding == "Tensor" and p.card)
                             ).n_layers == 16  # a Tensor preview still carries the card


def test_card_missing_a_field_exo_requires():
    card = model_card(MODEL, *MODEL_CARDS[MODEL])
    del card["backends"]
    with pytest.raises(ExoSchemaError, match="backends"):
        schema.parse_card(card)


def test_events_and_error_bodies():
    inst = state(2).place(state(2).cards[MODEL], "Pipeline", "MlxRing", 2)
    ready = schema.parse_event(json.dumps({"type": "ready", "instance": to_snake_keys(inst)}))
    assert ready.kind == "ready" and ready.instance_id == inst["MlxRingInstance"]["instanceId"]
    assert schema.parse_event('{"type": "timeout", "message": "No instance"}').kind == "timeout"
    with pytest.raises(ExoSchemaError, match="not JSON"):
        schema.parse_event(": keep-alive")
    assert schema.error_text({"error": {"message": "No cycles\nfound", "type": "Bad Request",
                                        "param": None, "code": 400}}) == "No cycles found"
    assert schema.error_text({"detail": [{"loc": ["query", "timeout_seconds"],
                                          "msg": "Input should be less than or equal to 300"}]}
                             ) == "timeout_seconds: Input should be less than or equal to 300"
    assert schema.error_text("Internal Server Error") == "Internal Server Error"


def test_state_topology_and_built_instances_run():
    st = state(4, rdma=True)
    cluster = schema.parse_state(st.state())
    topo = cluster.topology
    assert topo.ip("n0", "n2") == "10.0.0.3" and topo.rdma_iface[("n0", "n2")] == "rdma_en2"
    assert cluster.nodes["n3"].ram_available == 8 * GIB
    card = schema.parse_card(st.cards[MODEL])
    ranks = [Rank("n3", 0, 3), Rank("n1", 3, 9), Rank("n0", 9, 16)]
    for tag in ("MlxRingInstance", "MlxJacclInstance"):
        inst = schema.build_instance(tag, card, ranks, topo, 50000)
        assert check_runnable(inst, st) == [(0, "n3", 0, 3), (1, "n1", 3, 9), (2, "n0", 9, 16)]
    # a ring order whose neighbours exo never connected is refused, naming them
    st.links = [("n0", "n1"), ("n1", "n0")]
    with pytest.raises(UserError, match="no connection from n3 to n1"):
        schema.build_instance("MlxRingInstance", card, ranks,
                              schema.parse_state(st.state()).topology, 50000)


def test_jaccl_rank0_moved_with_topology():
    st = state(3, rdma=True)
    view = schema.parse_instance(st.place(st.cards[MODEL], "Pipeline", "MlxJaccl", 3))
    topo = schema.parse_state(st.state()).topology
    inst = schema.rewrite_instance(view, [Rank("n2", 0, 8), Rank("n0", 8, 16)], topo=topo)
    assert check_runnable(inst, st) == [(0, "n2", 0, 8), (1, "n0", 8, 16)]
