"""`exo-bridge place` against tests/exo_server.py, a real HTTP server that behaves like current
exo's API (previews of every sharding, the event-stream await, `{"error": ...}` bodies, a
POST /instance that checks only total memory). Everything goes through the CLI, in process."""

from __future__ import annotations

import io
import itertools
import json
import threading
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from exo_bridge.cli import main as cli_main
from exo_server import GIB, ExoServer, FakeNode, check_runnable, model_card
from graphsplit.plan import Plan, Stage, write_plan

MODEL = "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"  # 32 layers, 4.32 GiB
SMALL = "mlx-community/Llama-3.2-1B-Instruct-4bit"  # 16 layers, 729,808,896 bytes


def three_nodes():
    return [FakeNode("id-studio", "studio", 64 * GIB, 48 * GIB, "10.0.0.1"),
            FakeNode("id-mini", "mini", 16 * GIB, 12 * GIB, "10.0.0.2"),
            FakeNode("id-air", "air", 16 * GIB, 10 * GIB, "10.0.0.3")]


def make_plan(tmp_path, stages, n=32, mem=None, runtime="exo-current", name="plan.json",
              model=MODEL) -> Path:
    mem = mem or {s.node: 1 * GIB for s in stages}
    plan = Plan(model={"name": "llama", "n_layers": n, "config_hash": "sha256:x",
                       "repo_id": model},
                stages=stages, runtime=runtime,
                predicted={"tpot_s": 0.03, "ttft_s": 0.5, "throughput_tps": 30.0,
                           "stage_memory_bytes": mem},
                nodes={s.node: {"memory_bytes": 12 * GIB} for s in stages})
    return write_plan(plan, tmp_path / name)


def place(*args: str, limit: float = 60.0) -> tuple[int, str, str]:
    """Run `exo-bridge place ARGS` in process; (exit code, stdout, stderr). A run still going
    after `limit` seconds is a hang: the test fails instead of waiting forever."""
    out, err, res = io.StringIO(), io.StringIO(), {}

    def go() -> None:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                res["rc"] = cli_main(["place", *args])
            except BaseException:  # noqa: BLE001 - reported by the assertion below
                res["crash"] = traceback.format_exc()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"exo-bridge place still waiting after {limit} s: {err.getvalue()}"
    assert "crash" not in res, f"exo-bridge place crashed:\n{res.get('crash')}"
    return res["rc"], out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def server():
    with ExoServer(three_nodes(), keepalive_s=0.05, apply_delay_s=0.05) as srv:
        yield srv


def test_every_subset_and_order_of_nodes_places(tmp_path, server):
    """Any subset of exo's nodes, in any order: exo's previews list Tensor and error entries
    beside the Pipeline ones, the await is an event stream; the bridge posts and waits."""
    names = ["studio", "mini", "air"]
    for k in (1, 2, 3):
        for order in itertools.permutations(names, k):
            cuts = [round(32 * i / k) for i in range(k + 1)]
            stages = [Stage(order[i], cuts[i], cuts[i + 1]) for i in range(k)]
            plan = make_plan(tmp_path, stages, name=f"{'-'.join(order)}.json")
            rc, out, err = place("--plan", str(plan), "--api", server.url, "--wait", "30")
            assert rc == 0, (order, err)
            assert "placed" in out and "ready" in out
            posted = server.state.posted[-1]
            assert check_runnable(posted, server.state) == [
                (i, f"id-{order[i]}", cuts[i], cuts[i + 1]) for i in range(k)]
    assert len(server.state.posted) == 3 + 6 + 6
    kinds = {(p["sharding"], p["instance"] is None) for p in server.state.previews(MODEL, None)}
    assert ("Tensor", False) in kinds and ("Pipeline", True) in kinds  # what was skipped


def test_wait_follows_the_event_stream_and_sends_exo_timeout(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("mini", 0, 12), Stage("studio", 12, 32)])
    rc, out, err = place("--plan", str(plan), "--api", server.url, "--wait", "7")
    assert rc == 0, err
    awaits = [p for m, p in server.state.requests if p.startswith("/instance/await")]
    assert awaits and all("timeout_seconds=" in p for p in awaits)
    assert float(awaits[0].split("timeout_seconds=")[1]) <= 7


def test_wait_is_bounded_when_the_instance_never_comes(tmp_path):
    """exo accepts the instance but never reports it (its master never applies it): exo's
    timeout event ends the stream, and the bridge says how long it waited."""
    with ExoServer(three_nodes(), keepalive_s=0.05, apply_delay_s=3600) as srv:
        plan = make_plan(tmp_path, [Stage("mini", 0, 12), Stage("studio", 12, 32)])
        rc, _, err = place("--plan", str(plan), "--api", srv.url, "--wait", "1")
        assert rc == 2 and len(srv.state.posted) == 1
        line = one_error_line(err)
        assert "ready within 1 s" in line and "--wait" in line


def test_keepalives_do_not_extend_the_wait(tmp_path):
    """A peer that keeps the stream alive forever and never sends exo's timeout event: the
    bridge's own total deadline ends it."""
    with ExoServer(three_nodes(), keepalive_s=0.05, apply_delay_s=3600,
                   honour_timeout=False) as srv:
        plan = make_plan(tmp_path, [Stage("mini", 0, 12), Stage("studio", 12, 32)])
        rc, _, err = place("--plan", str(plan), "--api", srv.url, "--wait", "1", "--timeout",
                           "5")
        assert rc == 2
        assert "ready within 1 s" in one_error_line(err)


def test_dry_run_posts_nothing_and_prints_a_runnable_instance(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("mini", 0, 10), Stage("air", 10, 16),
                                Stage("studio", 16, 32)])
    rc, out, err = place("--plan", str(plan), "--api", server.url, "--dry-run")
    assert rc == 0, err
    assert server.state.posted == []
    assert check_runnable(json.loads(out), server.state) == [
        (0, "id-mini", 0, 10), (1, "id-air", 10, 16), (2, "id-studio", 16, 32)]


def test_model_exo_cannot_resolve_is_said_so(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("studio", 0, 32)])
    rc, _, err = place("--plan", str(plan), "--api", server.url, "--model", "nobody/no-such-model")
    assert rc == 2
    line = one_error_line(err)
    assert "cannot resolve model nobody/no-such-model" in line and "File not found" in line


def test_model_card_fetch_that_hangs_is_not_unreachable(tmp_path):
    """exo has not cached the card and its fetch from Hugging Face hangs (offline): the API is
    up; the bridge says what exo was doing, after its own bound."""
    with ExoServer(three_nodes(), hub_online=False, hub_delay_s=5) as srv:
        plan = make_plan(tmp_path, [Stage("studio", 0, 32)])
        rc, _, err = place("--plan", str(plan), "--api", srv.url, "--model", "someone/uncached",
                           "--timeout", "1")
        assert rc == 2
        line = one_error_line(err)
        assert "cannot reach" not in line
        assert "Hugging Face" in line and "1 s" in line


def test_a_model_exo_fetches_places(tmp_path):
    card = model_card("someone/fetched", 32, 4 * GIB, 4096)
    with ExoServer(three_nodes(), hub={"someone/fetched": card}, keepalive_s=0.05) as srv:
        plan = make_plan(tmp_path, [Stage("air", 0, 16), Stage("studio", 16, 32)])
        rc, _, err = place("--plan", str(plan), "--api", srv.url, "--model", "someone/fetched")
        assert rc == 0, err
        assert "fetches it from Hugging Face" in err


def test_exo_error_bodies_are_one_line_of_exo_words(tmp_path):
    """exo answers `{"error": {"message": ...}}`: the line carries the message, not JSON."""
    nodes = [FakeNode("id-a", "a", 8 * GIB, 2 * GIB, "10.0.0.1"),
             FakeNode("id-b", "b", 8 * GIB, 2 * GIB, "10.0.0.2")]
    card = model_card("big/model", 32, 3 * GIB, 4096)
    with ExoServer(nodes, cards={"big/model": card}, keepalive_s=0.05) as srv:
        plan = make_plan(tmp_path, [Stage("a", 0, 16), Stage("b", 16, 32)], model="big/model")
        # exo places it (4 GiB available in all); then b's memory drops before the post
        orig = srv.state.create

        def create_after_drop(body):
            srv.state.nodes[1].ram_available = GIB // 2
            return orig(body)

        srv.state.create = create_after_drop
        rc, _, err = place("--plan", str(plan), "--api", srv.url)
        assert rc == 2
        line = one_error_line(err)
        assert "Insufficient memory to create instance" in line and '"message"' not in line


def test_exo_rule_checked_before_posting(tmp_path, server):
    """exo's POST /instance checks only the cluster's total memory; a rank whose layers exceed
    its node's available RAM under exo's own rule (storage_size / n_layers per layer) is
    refused by the bridge before anything is posted."""
    nodes = [FakeNode("id-a", "a", 8 * GIB, 4 * GIB, "10.0.0.1"),
             FakeNode("id-b", "b", 8 * GIB, 1 * GIB, "10.0.0.2")]
    with ExoServer(nodes, keepalive_s=0.05) as srv:
        plan = make_plan(tmp_path, [Stage("a", 0, 8), Stage("b", 8, 32)],
                         mem={"a": GIB // 4, "b": GIB // 4})
        rc, _, err = place("--plan", str(plan), "--api", srv.url)
        assert rc == 2 and srv.state.posted == []
        assert "storage_size / n_layers" in one_error_line(err)
        rc, _, err = place("--plan", str(plan), "--api", srv.url, "--skip-memory-check")
        assert rc == 0, err  # exo itself takes it: only the bridge protects the user


def test_measured_memory_checked_before_posting(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("mini", 0, 12), Stage("studio", 12, 32)],
                     mem={"mini": 20 * GIB, "studio": 3 * GIB})
    rc, _, err = place("--plan", str(plan), "--api", server.url)
    assert rc == 2 and server.state.posted == []
    assert "embedding and head on every rank" in one_error_line(err)


def test_built_from_state_when_no_preview_covers_the_plan(tmp_path):
    """exo's own RAM-proportional split of these three nodes fails its per-node rule (its
    Pipeline previews are errors; only the Tensor one succeeds); the plan's split fits, so the
    bridge builds the instance from exo's state: card from the Tensor preview, addresses from
    the topology."""
    s = 729_808_896
    card = model_card("tiny/three-way", 16, s, 3072, kv_heads=6)
    nodes = [FakeNode("id-a", "a", 8 * GIB, 30 * s // 100, "10.0.0.1"),
             FakeNode("id-b", "b", 8 * GIB, 50 * s // 100, "10.0.0.2"),
             FakeNode("id-c", "c", 8 * GIB, 27 * s // 100, "10.0.0.3")]
    with ExoServer(nodes, cards={"tiny/three-way": card}, keepalive_s=0.05) as srv:
        pre = srv.state.previews("tiny/three-way", None)
        assert not any(p["instance"] for p in pre if p["sharding"] == "Pipeline")
        plan = make_plan(tmp_path, [Stage("c", 0, 4), Stage("b", 4, 12), Stage("a", 12, 16)],
                         n=16, mem={"a": s // 8, "b": s // 8, "c": s // 8},
                         model="tiny/three-way")
        rc, _, err = place("--plan", str(plan), "--api", srv.url)
        assert rc == 0, err
        assert "built from exo's state" in err
        assert check_runnable(srv.state.posted[0], srv.state) == [
            (0, "id-c", 0, 4), (1, "id-b", 4, 12), (2, "id-a", 12, 16)]


def test_jaccl_any_rank_zero(tmp_path):
    with ExoServer(three_nodes(), rdma=True, keepalive_s=0.05) as srv:
        plan = make_plan(tmp_path, [Stage("air", 0, 12), Stage("studio", 12, 32)])
        rc, _, err = place("--plan", str(plan), "--api", srv.url, "--instance-meta",
                           "MlxJaccl")
        assert rc == 0, err
        inst = srv.state.posted[0]
        assert "MlxJacclInstance" in inst
        assert check_runnable(inst, srv.state) == [(0, "id-air", 0, 12),
                                                   (1, "id-studio", 12, 32)]


def test_node_map_file(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("a", 0, 8), Stage("b", 8, 32)])
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"a": "id-air", "b": "id-studio"}))
    rc, out, err = place("--plan", str(plan), "--api", server.url, "--node-map", str(m),
                         "--dry-run")
    assert rc == 0, err
    assert check_runnable(json.loads(out), server.state) == [(0, "id-air", 0, 8),
                                                             (1, "id-studio", 8, 32)]


def test_unknown_node_is_one_line(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("studio", 0, 20), Stage("laptop", 20, 32)])
    rc, _, err = place("--plan", str(plan), "--api", server.url, "--dry-run")
    assert rc == 2
    line = one_error_line(err)
    assert "laptop" in line and "--node-map" in line


def test_layer_count_mismatch(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("mini", 0, 6), Stage("studio", 6, 16)], n=16)
    rc, _, err = place("--plan", str(plan), "--api", server.url, "--dry-run")
    assert rc == 2
    line = one_error_line(err)
    assert "16 layers" in line and "32" in line


def test_memory_re_predicted_for_current_exo_from_cluster_file(tmp_path, server):
    """A plan made for legacy exo: memory is re-predicted under current exo's rule (embedding
    and head on every rank) from its cluster file."""
    from costtables import make_table, write_cluster

    big = 400 * (1 << 20)
    tables = {n: make_table(n, 32, model="llama-3.1-8b", embed_bytes=big, head_bytes=big,
                            memory_usable=12 * GIB) for n in ("mini", "studio")}
    cfile = write_cluster(tmp_path, tables)
    plan = Plan(model={"name": "llama-3.1-8b", "n_layers": 32, "config_hash": "sha256:toy",
                       "repo_id": MODEL},
                stages=[Stage("mini", 0, 12), Stage("studio", 12, 32)], runtime="exo-legacy",
                cluster_file=str(cfile))
    p = write_plan(plan, tmp_path / "legacy-plan.json")
    rc, _, err = place("--plan", str(p), "--api", server.url, "--dry-run")
    assert rc == 0, err
    assert "re-predicted" in err and "memory ok" in err


def test_server_checks_only_total_memory(server):
    """The test server is exo: POST /instance takes an instance whose ranges leave a gap, and
    refuses one whose model exceeds the cluster's total available RAM."""
    import urllib.error
    import urllib.request

    inst = server.state.place(server.state.cards[MODEL], "Pipeline", "MlxRing", 2)
    (_, body), = inst.items()
    for tagged in body["shardAssignments"]["runnerToShard"].values():
        tagged["PipelineShardMetadata"]["startLayer"] += 1  # a gap at layer 0
    req = urllib.request.Request(server.url + "/instance", method="POST",
                                 data=json.dumps({"instance": inst}).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    with pytest.raises(AssertionError):
        check_runnable(inst, server.state)
    for n in server.state.nodes:
        n.ram_available = GIB
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(
            server.url + "/instance", method="POST",
            data=json.dumps({"instance": inst}).encode()), timeout=10)
    assert e.value.code == 400
    assert "Insufficient memory" in json.loads(e.value.read())["error"]["message"]


def make_replica_plan(tmp_path, replicas, n=32, name="replicas.json"):
    """A plan of k replicas (INTERFACES I5): [(stages, streams, {node: memory bytes})]."""
    stages0 = replicas[0][0]
    plan = Plan(model={"name": "llama", "n_layers": n, "config_hash": "sha256:x",
                       "repo_id": MODEL},
                stages=stages0, runtime="exo-current", objective="throughput",
                workload={"streams": sum(r[1] for r in replicas)},
                predicted={"tpot_s": 0.03, "ttft_s": 0.5, "throughput_tps": 60.0,
                           "stage_memory_bytes": {n_: m for r in replicas
                                                  for n_, m in r[2].items()}},
                serving={"pattern": "batch-through", "micro_batch": 8, "max_batch": 8},
                replicas=[{"stages": [s.__dict__.copy() for s in st], "streams": b,
                           "predicted": {"tpot_s": 0.03, "ttft_s": 0.5, "throughput_tps": 30.0,
                                         "stage_memory_bytes": mem}}
                          for st, b, mem in replicas],
                nodes={s.node: {"memory_bytes": 12 * GIB} for r in replicas for s in r[0]})
    return write_plan(plan, tmp_path / name)


def test_replicas_post_one_instance_each_on_its_own_nodes(tmp_path, server):
    """A plan of 2 replicas: two instances posted, each placing exactly its replica's nodes
    and layer ranges (checked as exo's runners need them), each awaited by its own id."""
    plan = make_replica_plan(tmp_path, [
        ([Stage("studio", 0, 32)], 8, {"studio": GIB}),
        ([Stage("mini", 0, 20), Stage("air", 20, 32)], 8, {"mini": GIB, "air": GIB})])
    rc, out, err = place("--plan", str(plan), "--api", server.url, "--wait", "30")
    assert rc == 0, err
    assert len(server.state.posted) == 2
    assert check_runnable(server.state.posted[0], server.state) == [(0, "id-studio", 0, 32)]
    assert check_runnable(server.state.posted[1], server.state) == [
        (0, "id-mini", 0, 20), (1, "id-air", 20, 32)]
    assert out.count("ready") == 2 and "(1 ranks)" in out and "(2 ranks)" in out
    assert "replica 2/2" in err
    rc, out, _ = place("--plan", str(plan), "--api", server.url, "--dry-run")
    assert rc == 0 and len(json.loads(out)) == 2 and len(server.state.posted) == 2


def test_replicas_exo_rule_checked_per_replica_before_any_post(tmp_path):
    """exo's per-node rule is checked for every replica's own ranks before anything is
    posted: the second replica's node b, holding a whole model alone, is refused."""
    nodes = [FakeNode("id-a", "a", 16 * GIB, 12 * GIB, "10.0.0.1"),
             FakeNode("id-b", "b", 16 * GIB, 3 * GIB, "10.0.0.2"),
             FakeNode("id-c", "c", 16 * GIB, 12 * GIB, "10.0.0.3")]
    with ExoServer(nodes, keepalive_s=0.05) as srv:
        plan = make_replica_plan(tmp_path, [
            ([Stage("a", 0, 32)], 4, {"a": GIB // 4}),
            ([Stage("b", 0, 32)], 4, {"b": GIB // 4})])
        rc, _, err = place("--plan", str(plan), "--api", srv.url)
        assert rc == 2 and srv.state.posted == []
        line = one_error_line(err)
        assert "b (id-b) gets 32 of 32 layers" in line and "storage_size / n_layers" in line
        ok = make_replica_plan(tmp_path, [
            ([Stage("a", 0, 32)], 4, {"a": GIB // 4}),
            ([Stage("c", 0, 16), Stage("b", 16, 32)], 4, {"b": GIB // 4, "c": GIB // 4})],
            name="ok.json")
        rc, _, err = place("--plan", str(ok), "--api", srv.url, "--wait", "30")
        assert rc == 0, err
        assert [len(check_runnable(p, srv.state)) for p in srv.state.posted] == [1, 2]
