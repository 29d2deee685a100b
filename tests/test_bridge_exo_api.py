"""exo_api: parsing exo's instance JSON and rewriting it to a measured split (no HTTP)."""

from __future__ import annotations

import itertools

import pytest

from exo_bridge import exo_api
from exo_bridge.exo_api import ExoSchemaError, Rank
from exo_server import GIB, ExoState, FakeNode, MODEL_CARDS, model_card, to_snake_keys
from profiler.errors import UserError

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"  # 16 layers


def state(n=4) -> ExoState:
    nodes = [FakeNode(f"n{i}", f"host{i}", 16 * GIB, 8 * GIB, f"10.0.0.{i + 1}")
             for i in range(n)]
    return ExoState(nodes=nodes, cards={m: model_card(m, *v) for m, v in MODEL_CARDS.items()})


def test_parse_camel_and_snake_agree():
    st = state(3)
    inst = st.place(MODEL, "Pipeline", "MlxRing", 3)
    a = exo_api.parse_instance(inst)
    b = exo_api.parse_instance(to_snake_keys(inst))
    assert exo_api.instance_summary(a) == exo_api.instance_summary(b)
    assert a.n_layers == 16 and a.model_id == MODEL
    assert a.storage_bytes() == MODEL_CARDS[MODEL][1]
    assert exo_api.parse_instance({"instance": inst}).instance_id == a.instance_id


def test_every_ring_order_of_four_nodes_is_accepted():
    """Any rank order (and any subset of 2..4 nodes) re-indexes the ring's hosts consistently."""
    st = state(4)
    view = exo_api.parse_instance(st.place(MODEL, "Pipeline", "MlxRing", 4))
    for k in (2, 3, 4):
        for order in itertools.permutations(["n0", "n1", "n2", "n3"], k):
            cuts = [round(16 * i / k) for i in range(k + 1)]
            ranks = [Rank(order[i], cuts[i], cuts[i + 1]) for i in range(k)]
            inst = exo_api.rewrite_instance(view, ranks)
            st.validate(inst)
            hbn = inst["MlxRingInstance"]["hostsByNode"]
            ip = {n: f"10.0.0.{int(n[1]) + 1}" for n in order}
            for r, u in enumerate(order):
                assert hbn[u][r]["ip"] == "0.0.0.0"
                for nb in {(r - 1) % k, (r + 1) % k} - {r}:
                    assert hbn[u][nb]["ip"] == ip[order[nb]], (order, u, nb)


def test_jaccl_matrix_reindexed_and_rank0_kept():
    st = state(3)
    view = exo_api.parse_instance(st.place(MODEL, "Pipeline", "MlxJaccl", 3))
    inst = exo_api.rewrite_instance(view, [Rank("n0", 0, 4), Rank("n2", 4, 10),
                                           Rank("n1", 10, 16)])
    st.validate(inst)
    m = inst["MlxJacclInstance"]["jacclDevices"]
    assert m[1][2] == "rdma_en1" and m[2][1] == "rdma_en2" and m[0][0] is None
    with pytest.raises(UserError, match="rank 0"):
        exo_api.rewrite_instance(view, [Rank("n1", 0, 8), Rank("n0", 8, 16)])


def test_flat_hosts_list_reindexed():
    st = state(2)
    inst = st.place(MODEL, "Pipeline", "MlxRing", 2)
    body = inst["MlxRingInstance"]
    del body["hostsByNode"], body["ephemeralPort"]
    body["hosts"] = [{"ip": "10.0.0.1", "port": 1}, {"ip": "10.0.0.2", "port": 2}]
    out = exo_api.rewrite_instance(exo_api.parse_instance(inst),
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
        exo_api.parse_instance(bad)


def test_planned_node_outside_placement_is_refused():
    st = state(3)
    view = exo_api.parse_instance(st.place(MODEL, "Pipeline", "MlxRing", 2))
    with pytest.raises(UserError, match="n2"):
        exo_api.rewrite_instance(view, [Rank("n0", 0, 8), Rank("n2", 8, 16)])


def test_state_nodes():
    st = state(2)
    nodes = exo_api.parse_state_nodes(st.state())
    assert nodes["n1"].name == "host1" and nodes["n1"].ram_available == 8 * GIB
    assert exo_api.parse_state_nodes(to_snake_keys(st.state()))["n0"].ram_total == 16 * GIB


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
    inst = to_list_form(st.place(MODEL, "Pipeline", "MlxRing", 3), dict_items)
    view = exo_api.parse_instance(inst)
    assert [s.node_id for s in view.shards] == ["n0", "n1", "n2"]
    out = exo_api.rewrite_instance(view, [Rank("n2", 0, 5), Rank("n0", 5, 16)])
    st.validate(out)
    assert exo_api.instance_summary(exo_api.parse_instance(out)) == [(0, "n2", 0, 5),
                                                                     (1, "n0", 5, 16)]
    assert out["MlxRingInstance"]["shardAssignments"]["primaryOutputNode"] == 1
