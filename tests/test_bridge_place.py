"""`exo-bridge place` against a real exo-shaped HTTP server (tests/exo_server.py, port 0)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from exo_bridge import exo_api
from exo_bridge.cli import main as cli_main
from exo_server import GIB, ExoServer, FakeNode, Reject, to_snake_keys
from graphsplit.plan import Plan, Stage, write_plan

MODEL = "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"
ROOT = Path(__file__).resolve().parents[1]


def three_nodes():
    return [FakeNode("id-studio", "studio", 64 * GIB, 48 * GIB, "10.0.0.1"),
            FakeNode("id-mini", "mini", 16 * GIB, 12 * GIB, "10.0.0.2"),
            FakeNode("id-air", "air", 16 * GIB, 10 * GIB, "10.0.0.3")]


def make_plan(tmp_path, stages, n=32, mem=None, runtime="exo-current", name="plan.json",
              nodes_mem=None) -> Path:
    mem = mem or {s.node: 3 * GIB for s in stages}
    plan = Plan(model={"name": "llama-3.1-8b", "n_layers": n, "config_hash": "sha256:x",
                       "repo_id": MODEL},
                stages=stages, runtime=runtime,
                predicted={"tpot_s": 0.03, "ttft_s": 0.5, "throughput_tps": 30.0,
                           "stage_memory_bytes": mem},
                nodes={s.node: {"memory_bytes": (nodes_mem or {}).get(s.node, 12 * GIB)}
                       for s in stages})
    return write_plan(plan, tmp_path / name)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exo_bridge.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def assert_one_line_error(cp: subprocess.CompletedProcess, *needles: str) -> None:
    assert cp.returncode != 0
    err = cp.stderr.strip()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def server():
    with ExoServer(three_nodes()) as srv:
        yield srv


def ranks_of(instance: dict) -> list[tuple[int, str, int, int]]:
    return exo_api.instance_summary(exo_api.parse_instance(instance))


def test_dry_run_prints_an_instance_the_server_accepts(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("mini", 0, 10), Stage("air", 10, 16),
                                Stage("studio", 16, 32)])
    cp = run_cli("place", "--plan", str(plan), "--api", server.url, "--model", MODEL,
                 "--dry-run")
    assert cp.returncode == 0, cp.stderr
    instance = json.loads(cp.stdout)
    assert server.state.posted == []  # dry run posts nothing
    assert ranks_of(instance) == [(0, "id-mini", 0, 10), (1, "id-air", 10, 16),
                                  (2, "id-studio", 16, 32)]
    # the server's own validator accepts it, over real HTTP
    req = urllib.request.Request(server.url + "/instance", method="POST",
                                 data=json.dumps({"instance": instance}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    assert len(server.state.posted) == 1
    # ring neighbours re-indexed: every rank's neighbours have real addresses
    hbn = instance["MlxRingInstance"]["hostsByNode"]
    assert hbn["id-mini"][0]["ip"] == "0.0.0.0"
    assert {hbn["id-mini"][1]["ip"], hbn["id-mini"][2]["ip"]} <= {"10.0.0.3", "10.0.0.1"}
    assert hbn["id-air"][0]["ip"] == "10.0.0.2" and hbn["id-air"][2]["ip"] == "10.0.0.1"


def test_place_posts_records_and_awaits(tmp_path, server, capsys):
    plan = make_plan(tmp_path, [Stage("mini", 0, 12), Stage("studio", 12, 32)])
    rc = cli_main(["place", "--plan", str(plan), "--api", server.url, "--model", MODEL])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "placed" in out.out
    assert len(server.state.posted) == 1
    posted = server.state.posted[0]
    assert ranks_of(posted) == [(0, "id-mini", 0, 12), (1, "id-studio", 12, 32)]
    # fewer nodes than exo offers: air is dropped everywhere
    body = posted["MlxRingInstance"]
    assert sorted(body["hostsByNode"]) == ["id-mini", "id-studio"]
    assert ("GET", f"/instance/await?model_id={MODEL.replace('/', '%2F')}") in \
        server.state.requests


def test_fresh_ids(tmp_path, server, capsys):
    plan = make_plan(tmp_path, [Stage("studio", 0, 20), Stage("mini", 20, 32)])
    exo = server.state.place(MODEL, "Pipeline", "MlxRing", 2)
    assert cli_main(["place", "--plan", str(plan), "--api", server.url, "--dry-run"]) == 0
    ours = json.loads(capsys.readouterr().out)
    old, new = exo_api.parse_instance(exo), exo_api.parse_instance(ours)
    assert new.instance_id != old.instance_id
    assert not {s.runner_id for s in new.shards} & {s.runner_id for s in old.shards}


def test_node_map_file(tmp_path, server, capsys):
    plan = make_plan(tmp_path, [Stage("a", 0, 8), Stage("b", 8, 32)])
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"a": "id-air", "b": "id-studio"}))
    assert cli_main(["place", "--plan", str(plan), "--api", server.url, "--node-map", str(m),
                     "--dry-run"]) == 0
    assert ranks_of(json.loads(capsys.readouterr().out)) == [(0, "id-air", 0, 8),
                                                             (1, "id-studio", 8, 32)]


def test_snake_case_placement_is_understood(tmp_path, server, capsys):
    server.state.placement_transform = to_snake_keys
    plan = make_plan(tmp_path, [Stage("mini", 0, 12), Stage("studio", 12, 32)])
    assert cli_main(["place", "--plan", str(plan), "--api", server.url]) == 0
    posted = server.state.posted[0]
    assert "shard_assignments" in posted["MlxRingInstance"]  # exo's fields kept as they came
    assert ranks_of(posted) == [(0, "id-mini", 0, 12), (1, "id-studio", 12, 32)]


def test_jaccl_same_rank0_accepted_and_reorder_refused(tmp_path, server, capsys):
    plan = make_plan(tmp_path, [Stage("studio", 0, 20), Stage("mini", 20, 32)])
    assert cli_main(["place", "--plan", str(plan), "--api", server.url, "--instance-meta",
                     "MlxJaccl"]) == 0
    inst = server.state.posted[0]
    assert "MlxJacclInstance" in inst
    plan2 = make_plan(tmp_path, [Stage("mini", 0, 12), Stage("studio", 12, 32)], name="p2.json")
    cp = run_cli("place", "--plan", str(plan2), "--api", server.url, "--instance-meta",
                 "MlxJaccl")
    assert_one_line_error(cp, "rank 0")


def test_preview_used_when_placement_lacks_a_planned_node(tmp_path, server, capsys):
    # exo's placement for 2 nodes is studio+mini; the plan wants studio+air
    plan = make_plan(tmp_path, [Stage("studio", 0, 24), Stage("air", 24, 32)])
    assert cli_main(["place", "--plan", str(plan), "--api", server.url, "--dry-run"]) == 0
    out = capsys.readouterr()
    assert ranks_of(json.loads(out.out)) == [(0, "id-studio", 0, 24), (1, "id-air", 24, 32)]
    assert "preview" in out.err


def test_unknown_node_is_one_line(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("studio", 0, 20), Stage("laptop", 20, 32)])
    cp = run_cli("place", "--plan", str(plan), "--api", server.url, "--dry-run")
    assert_one_line_error(cp, "laptop", "--node-map")


def test_unreachable_api_is_one_line(tmp_path):
    plan = make_plan(tmp_path, [Stage("studio", 0, 32)])
    with ExoServer(three_nodes()) as srv:  # a port that was just free
        url = srv.url
    cp = run_cli("place", "--plan", str(plan), "--api", url, "--model", MODEL)
    assert_one_line_error(cp, "cannot reach exo's API", url)


@pytest.mark.parametrize("shape, needle", [
    (lambda inst: {"TensorflowInstance": list(inst.values())[0]}, "TensorflowInstance"),
    (lambda inst: {"MlxRingInstance": {**list(inst.values())[0],
                                       "shardAssignments": {"modelId": MODEL, "assignments": []}}},
     "runnerToShard"),
    (lambda inst: [inst], "expected one tag"),
])
def test_unknown_shapes_are_one_line(tmp_path, server, shape, needle):
    server.state.placement_transform = shape
    plan = make_plan(tmp_path, [Stage("mini", 0, 12), Stage("studio", 12, 32)])
    # a subprocess would not see this in-process transform: run in-process, check stderr
    import io
    from contextlib import redirect_stderr

    buf = io.StringIO()
    with redirect_stderr(buf):
        rc = cli_main(["place", "--plan", str(plan), "--api", server.url, "--dry-run"])
    err = buf.getvalue()
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err


def test_memory_check_against_current_exo(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("mini", 0, 12), Stage("studio", 12, 32)],
                     mem={"mini": 20 * GIB, "studio": 3 * GIB})
    cp = run_cli("place", "--plan", str(plan), "--api", server.url, "--dry-run")
    assert_one_line_error(cp, "mini", "embedding and head on every rank")
    cp = run_cli("place", "--plan", str(plan), "--api", server.url, "--dry-run",
                 "--skip-memory-check")
    assert cp.returncode == 0, cp.stderr


def test_layer_count_mismatch(tmp_path, server):
    plan = make_plan(tmp_path, [Stage("mini", 0, 6), Stage("studio", 6, 16)], n=16)
    cp = run_cli("place", "--plan", str(plan), "--api", server.url, "--model", MODEL,
                 "--dry-run")
    assert_one_line_error(cp, "16 layers", "32")


def test_server_rejects_bad_instances(server):
    inst = server.state.place(MODEL, "Pipeline", "MlxRing", 2)
    view = exo_api.parse_instance(inst)
    gap = exo_api.rewrite_instance(view, [exo_api.Rank("id-studio", 0, 10),
                                          exo_api.Rank("id-mini", 11, 32)])
    with pytest.raises(Reject, match="do not continue"):
        server.state.validate(gap)
    short = exo_api.rewrite_instance(view, [exo_api.Rank("id-studio", 0, 10),
                                            exo_api.Rank("id-mini", 10, 31)])
    with pytest.raises(Reject, match="layers end at 31"):
        server.state.validate(short)
    good = exo_api.rewrite_instance(view, [exo_api.Rank("id-mini", 0, 10),
                                           exo_api.Rank("id-studio", 10, 32)])
    server.state.validate(good)
    body = good["MlxRingInstance"]
    r = next(iter(body["shardAssignments"]["runnerToShard"].values()))["PipelineShardMetadata"]
    r["worldSize"] = 3
    with pytest.raises(Reject, match="worldSize"):
        server.state.validate(good)


def test_memory_re_predicted_for_current_exo_from_cluster_file(tmp_path, server, capsys):
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
    assert cli_main(["place", "--plan", str(p), "--api", server.url, "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "re-predicted" in err and "memory ok" in err


def test_exo_without_state_matches_by_node_id(tmp_path, server, capsys):
    server.state.state_available = False
    plan = make_plan(tmp_path, [Stage("id-air", 0, 8), Stage("id-studio", 8, 32)])
    assert cli_main(["place", "--plan", str(plan), "--api", server.url, "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "/state unavailable" in out.err
    assert ranks_of(json.loads(out.out)) == [(0, "id-air", 0, 8), (1, "id-studio", 8, 32)]
    plan2 = make_plan(tmp_path, [Stage("studio", 0, 32)], name="names.json")
    assert cli_main(["place", "--plan", str(plan2), "--api", server.url, "--dry-run"]) == 2
    assert "--node-map" in capsys.readouterr().err
