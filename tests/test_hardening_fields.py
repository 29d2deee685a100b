"""Every field of every file format, mutated to every bad class, through the real readers.

Start from a valid file (cost table, cluster file, plan, node map, hostfile), replace one field
(every leaf and every container, found by walking the JSON tree) with one bad value (0, -1,
NaN, +-Infinity, an integer of 400 digits, a string, a bool, null, a list, an object) and run
the real command in-process through `guard`. The reader either accepts the value (a value of
the field's own type that is merely unusual, e.g. a latency of 0) or refuses it with exit code
2 and exactly one stderr line that names the file and the field, with no traceback and no file
written or changed. Values that are never numbers (NaN, Infinity, 400 digits) and values of
another JSON type than the field's are always refused.

Exhaustive over fields x bad classes for each format's reader (fast), and hypothesis-driven
through the commands themselves (split-model for cost tables and cluster files, exo-bridge
compare for plans).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costtables import make_table, write_cluster
from profiler.errors import guard

BAD = [0, -1, float("nan"), float("inf"), float("-inf"), 10**400, "abc", True, None, [], {},
       [1], {"a": 1}]
NEVER_OK = ("nan", "inf", "-inf", "400 digits")  # refused in every field

# the realistic `method` of a profile-model table (profiler/profile.py), so its typed fields
# are exercised too
METHOD = {"warmup": 2, "repeats": 5, "statistic": "median", "max_rel_spread": 0.15,
          "max_rounds": 3, "remeasure": "text", "batch": 1, "every_layer": False,
          "weights": "generated", "prefill": "text", "decode": "text", "sharing": "text",
          "tied_head": None, "timing": "text", "clock": "wall", "flush_caches": True,
          "cache_flush": "text", "settle_s": 0.0, "settle": "text",
          "decode_min_sample_s": 0.002, "decode_max_steps": 8, "decode_steps": "text",
          "profiler": "profiler (mlx-measured-split)", "peak_rss_bytes": 123456,
          "profile_wall_s": 1.5, "load_average_at_end": 0.5}
FREE = ("device.microbench",)  # informational, any JSON (NaN etc. still refused)
NULLABLE = {"quantization", "repo_id", "layer", "tied_head", "cluster_file", "profile",
            "derive_from", "objective_value", "work", "lower_bound", "gap"}


def _label(v) -> str:
    if isinstance(v, float) and v != v:
        return "nan"
    if v == float("inf"):
        return "inf"
    if v == float("-inf"):
        return "-inf"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**300:
        return "400 digits"
    return json.dumps(v)


def _jtype(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


def walk(v, path=()):
    """Every (path, value) of the tree, containers included (not the root)."""
    if isinstance(v, dict):
        items = v.items()
    elif isinstance(v, list):
        items = enumerate(v)
    else:
        return
    for k, x in items:
        yield path + (k,), x
        yield from walk(x, path + (k,))


def dotted(path) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return out


def mutated(data, path, value):
    d = copy.deepcopy(data)
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    if value is DELETE:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return d


DELETE = object()  # a mutation class of its own: the field is removed


def _names(path) -> set[str]:
    """The field's own key and its parent's: one of them must be in the message."""
    keys = [k for k in path if isinstance(k, str)]
    return set(keys[-2:]) or {str(path[-1])}


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def run_guarded(fn, *args) -> tuple[int, str]:
    err = io.StringIO()
    def call(*a):
        r = fn(*a)  # a command's exit code, or what a reader returned
        return r if isinstance(r, int) and not isinstance(r, bool) else 0

    call.__module__ = getattr(fn, "__module__", "test")
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = guard(call)(*args)
    return rc, err.getvalue()


def check_outcome(rc: int, err: str, path, original, bad, filename: str) -> None:
    where = f"{dotted(path)} = {'(deleted)' if bad is DELETE else _label(bad)}"
    assert "Traceback" not in err, where
    assert rc in (0, 2), f"{where}: exit code {rc}: {err}"
    free = any(dotted(path).startswith(f) for f in FREE)
    must_refuse = bad is not DELETE and (_label(bad) in NEVER_OK or (
        not free and original is not None and _jtype(bad) != _jtype(original)
        and not (bad is None and path[-1] in NULLABLE)))
    if must_refuse:
        assert rc == 2, f"{where}: accepted"
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"{where}: {err}"
        assert lines[0].startswith("error: ") and filename in lines[0], f"{where}: {err}"
        if bad is DELETE:  # what breaks is named (a reference, a missing row): the file is enough
            return
        # the field, or (a broken reference: another field names it) the value itself
        named = _names(path) | ({bad} if isinstance(bad, str) else set())
        assert any(n in lines[0] for n in named), f"{where}: field not named: {err}"


def write_raw(p: Path, data) -> None:
    p.write_text(json.dumps(data))  # NaN / Infinity tokens and long integers as a user may


# -- the formats --------------------------------------------------------------------------------

def table_dict(host="a") -> dict:
    t = make_table(host, n_layers=2, prefill_tokens=(16, 64), decode_context=(64, 256))
    t.method = dict(METHOD)
    t.quantization = {"bits": 4, "group_size": 64}
    t.device.microbench = {"bandwidth": {"bandwidth_gbs": 10.0}, "measured": True}
    return t.to_dict()


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cl")
    tables = {n: make_table(n, n_layers=2, prefill_tokens=(16, 64), decode_context=(64, 256))
              for n in ("a", "b")}
    for t in tables.values():
        t.method = dict(METHOD)
    p = write_cluster(d, tables, links=[{"from": "a", "to": "b", "latency_ms": 0.2,
                                         "bandwidth_gbps": 40, "both_ways": True,
                                         "measured": {"by": "profile-link", "repeats": 3,
                                                      "at": "2026-01-01T00:00:00Z",
                                                      "sizes": {"token": {"bytes": 8192,
                                                                          "rtt_ms": 0.3}}}}],
                      default_link={"latency_ms": 1.0, "bandwidth_gbps": 10.0},
                      node_fields={"b": {"memory_bytes": 2**34, "available_bytes": 2**34,
                                         "total_bytes": 2**35}},
                      extra_nodes=[{"id": "c", "derive_from": "a",
                                    "chip": {"memory_bandwidth_gbs": 800, "fp16_tflops": 54,
                                             "memory_bytes": 2**37}}])
    from graphsplit.cli import main as split_main
    rc, err = run_guarded(split_main, [str(p), "--out", str(d / "plan.json"), "--simulate"])
    assert rc == 0, err
    return d


def test_cost_table_every_field(tmp_path):
    """The cost table reader (read_table, used by every command that reads a table)."""
    from profiler.costtable import read_table

    data = table_dict()
    f = tmp_path / "t.json"
    n = 0
    for path, original in walk(data):
        for bad in BAD + [DELETE]:
            write_raw(f, mutated(data, path, bad))
            rc, err = run_guarded(read_table, f)
            check_outcome(rc, err, path, original, bad, str(f))
            n += 1
    assert n > 1000  # every field of a real table, not a token sample


def test_cluster_every_field(cluster_dir, tmp_path):
    from graphsplit.cluster import load_cluster

    data = json.loads((cluster_dir / "cluster.json").read_text())
    f = cluster_dir / "mut.json"
    for path, original in walk(data):
        for bad in BAD + [DELETE]:
            write_raw(f, mutated(data, path, bad))
            rc, err = run_guarded(load_cluster, f)
            check_outcome(rc, err, path, original, bad, str(f))
    f.unlink()


def test_plan_every_field(cluster_dir):
    """read_plan: the one validator every command that reads a plan goes through."""
    from graphsplit.plan import read_plan

    data = json.loads((cluster_dir / "plan.json").read_text())
    f = cluster_dir / "mut-plan.json"
    n = 0
    for path, original in walk(data):
        for bad in BAD + [DELETE]:
            write_raw(f, mutated(data, path, bad))
            rc, err = run_guarded(read_plan, f)
            check_outcome(rc, err, path, original, bad, str(f))
            n += 1
    f.unlink()
    assert n > 1000


@pytest.mark.parametrize("fmt", ["node map", "ring hostfile", "launch hostfile"])
def test_node_map_and_hostfile_every_field(tmp_path, fmt):
    from exo_bridge.formats import read_hostfile, read_node_map

    data, reader = {
        "node map": ({"studio": "exo-node-1", "mini": "exo-node-2"}, read_node_map),
        "ring hostfile": ([["127.0.0.1:5000"], ["10.0.0.2:5001", "10.0.1.2:5001"]],
                          read_hostfile),
        "launch hostfile": ({"backend": "ring", "envs": ["A=1"],
                             "hosts": [{"ssh": "m1", "ips": ["10.0.0.1"]},
                                       {"ssh": "m2", "ips": ["10.0.0.2"]}]}, read_hostfile),
    }[fmt]
    f = tmp_path / "f.json"
    for path, original in walk(data):
        for bad in BAD + [DELETE]:
            write_raw(f, mutated(data, path, bad))
            rc, err = run_guarded(reader, f)
            check_outcome(rc, err, path, original, bad, str(f))
    for bad_addr in ("10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", ":5000", "h:p"):
        if fmt == "ring hostfile":
            write_raw(f, [[bad_addr], ["127.0.0.1:5000"]])
            rc, err = run_guarded(reader, f)
            assert rc == 2 and "[0][0]" in err and "ip:port" in err, err


# -- through the commands themselves (hypothesis picks field and bad value) -----------------------

@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(draw=st.data())
def test_split_model_with_a_mutated_cost_table(cluster_dir, draw):
    from graphsplit.cli import main as split_main

    prof = cluster_dir / "profiles" / "a.json"
    good = prof.read_text()
    data = json.loads(good)
    path, original = draw.draw(st.sampled_from(list(walk(data))))
    bad = draw.draw(st.sampled_from(BAD))
    try:
        write_raw(prof, mutated(data, path, bad))
        before = snapshot(cluster_dir)
        rc, err = run_guarded(split_main, [str(cluster_dir / "cluster.json")])
        check_outcome(rc, err, path, original, bad, str(prof))
        assert snapshot(cluster_dir) == before  # nothing written or changed
    finally:
        prof.write_text(good)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_split_model_with_a_mutated_cluster_file(cluster_dir, data):
    from graphsplit.cli import main as split_main

    good = json.loads((cluster_dir / "cluster.json").read_text())
    path, original = data.draw(st.sampled_from(list(walk(good))))
    bad = data.draw(st.sampled_from(BAD))
    f = cluster_dir / "mut-cl.json"
    try:
        write_raw(f, mutated(good, path, bad))
        out = cluster_dir / "out-plan.json"
        before = snapshot(cluster_dir)
        rc, err = run_guarded(split_main, [str(f), "--out", str(out)])
        check_outcome(rc, err, path, original, bad, str(f))
        if rc == 2:
            assert snapshot(cluster_dir) == before and not out.exists()
    finally:
        f.unlink()
        (cluster_dir / "out-plan.json").unlink(missing_ok=True)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_exo_bridge_compare_with_a_mutated_plan(cluster_dir, data):
    from exo_bridge.cli import main as bridge_main

    good = json.loads((cluster_dir / "plan.json").read_text())
    path, original = data.draw(st.sampled_from(list(walk(good))))
    bad = data.draw(st.sampled_from(BAD))
    f = cluster_dir / "mut-plan2.json"
    try:
        write_raw(f, mutated(good, path, bad))
        before = snapshot(cluster_dir)
        rc, err = run_guarded(bridge_main, ["compare", str(f)])
        check_outcome(rc, err, path, original, bad, str(f))
        assert snapshot(cluster_dir) == before
    finally:
        f.unlink()


def test_hand_edited_plan_with_an_unknown_node(cluster_dir, tmp_path):
    from exo_bridge.cli import main as bridge_main

    good = json.loads((cluster_dir / "plan.json").read_text())
    good["stages"][0]["node"] = "nosuch"
    f = tmp_path / "p.json"
    write_raw(f, good)
    rc, err = run_guarded(bridge_main, ["compare", str(f)])
    assert rc == 2 and "stages[0].node: 'nosuch' is not one of the plan's nodes" in err, err


@pytest.mark.parametrize("edit,expect", [
    (lambda d: d["stages"][0].update(node="nosuch"), "stages[0].node: 'nosuch' is not one of"),
    (lambda d: d["predicted"].update(tpot_s="fast"), "predicted.tpot_s: must be a number"),
    (lambda d: d["workload"].update(prompt_tokens=float("nan")), "workload.prompt_tokens: NaN"),
    (lambda d: d["baselines"]["even"]["predicted"]["stage_compute_s"].update(a=[1]),
     "baselines.even.predicted.stage_compute_s.a: must be a number"),
    (lambda d: d["stages"][0].update(end_layer=10**400), "stages[0].end_layer: an integer of 401"),
])
def test_every_command_that_reads_a_plan_refuses_it_the_same_way(cluster_dir, tmp_path, edit,
                                                                 expect):
    """compare, place, run and strategy-check all read plans through read_plan: the same bad
    plan gives the same line from each (before anything is contacted or started)."""
    from exo_bridge.cli import main as bridge_main

    data = json.loads((cluster_dir / "plan.json").read_text())
    edit(data)
    f = tmp_path / "hand-edited.json"
    write_raw(f, data)
    lines = set()
    for argv in (["compare", str(f)], ["place", "--plan", str(f), "--api", "http://127.0.0.1:9",
                                       "--model", "m"],
                 ["run", str(f)], ["strategy-check", "--plan", str(f), "--node", "a:1000"]):
        rc, err = run_guarded(bridge_main, argv)
        assert rc == 2, (argv, err)
        lines.add(err.strip())
    assert len(lines) == 1, lines
    line = lines.pop()
    assert expect in line and str(f) in line and "\n" not in line, line


def test_every_field_the_splitter_writes_into_a_plan_is_checked_on_read():
    """A new Prediction or solver field must get a schema entry, or a hand edit of it would pass
    unchecked (the protocol fields once did)."""
    from graphsplit.costmodel import Prediction
    from graphsplit.manual import manual_solver_entry
    from graphsplit.plan import PREDICTED, SOLVER

    written = {f.name for f in dataclasses.fields(Prediction)} | {"fits"}
    assert written - set(PREDICTED.fields) == set()
    assert set(manual_solver_entry("a:1")) - set(SOLVER.fields) == set()
