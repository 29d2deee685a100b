"""exo-bridge compare / strategy-check / exo-legacy (with and without a legacy-exo-shaped package)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graphsplit.plan import Plan, Stage, write_plan

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def plan_file(tmp_path, cluster_file=None, baselines=True) -> Path:
    stages = [Stage("mini", 0, 12), Stage("studio", 12, 32)]
    base = {}
    if baselines:
        legacy = [{"node": "studio", "start_layer": 0, "end_layer": 26},
                  {"node": "mini", "start_layer": 26, "end_layer": 32}]
        base = {"exo-legacy": {"stages": legacy, "predicted": {"tpot_s": 0.05, "ttft_s": 0.6,
                                                               "throughput_tps": 20.0}},
                "exo-current": {"stages": legacy, "predicted": {"tpot_s": 0.045, "ttft_s": 0.55,
                                                                "throughput_tps": 22.0}}}
    plan = Plan(model={"name": "llama-3.1-8b", "n_layers": 32, "config_hash": "x"},
                stages=stages, runtime="exo-legacy",
                predicted={"tpot_s": 0.03, "ttft_s": 0.4, "throughput_tps": 33.0},
                baselines=base, cluster_file=cluster_file,
                nodes={"mini": {"memory_bytes": 12 * GIB}, "studio": {"memory_bytes": 48 * GIB}})
    return write_plan(plan, tmp_path / "plan.json")


def cli(*args, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "exo_bridge.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env=e)


def test_compare_from_baselines(tmp_path):
    cp = cli("compare", str(plan_file(tmp_path)))
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    assert "exo legacy" in out and "exo current" in out and "measured" in out
    assert "mini[0,12), studio[12,32)" in out and "studio[0,26), mini[26,32)" in out
    assert "30.00" in out and "50.00" in out and "45.00" in out
    js = json.loads(cli("compare", str(plan_file(tmp_path)), "--json").stdout)
    assert js["measured"]["stages"][0] == {"node": "mini", "start_layer": 0, "end_layer": 12}


def test_compare_repredicts_from_cluster_file(tmp_path):
    pytest.importorskip("graphsplit.baselines")
    from costtables import make_table, write_cluster

    tables = {"studio": make_table("studio", 32, decode_s=0.001, memory_usable=48 * GIB),
              "mini": make_table("mini", 32, decode_s=0.004, memory_usable=12 * GIB)}
    cfile = write_cluster(tmp_path, tables)
    cp = cli("compare", str(plan_file(tmp_path, str(cfile), baselines=False)))
    assert cp.returncode == 0, cp.stderr
    assert "re-predicted" in cp.stdout and "(not in the plan" not in cp.stdout


def test_compare_missing_baselines_without_cluster(tmp_path):
    cp = cli("compare", str(plan_file(tmp_path, baselines=False)))
    assert cp.returncode == 0, cp.stderr
    assert "not in the plan" in cp.stdout


def test_strategy_check(tmp_path):
    p = plan_file(tmp_path)
    cp = cli("strategy-check", "--plan", str(p), "--node", "studio:65536", "--node", "mini:16384")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("decision: plan")
    stages = json.loads(cp.stdout.strip().splitlines()[-1])
    assert stages == [{"node": "mini", "start_layer": 0, "end_layer": 12},
                      {"node": "studio", "start_layer": 12, "end_layer": 32}]
    cp = cli("strategy-check", "--plan", str(p), "--node", "studio:65536", "--node", "air:8192")
    assert "decision: fallback" in cp.stdout and "mini" in cp.stdout and "air" in cp.stdout


def test_exo_legacy_without_exo_is_one_line(tmp_path):
    cp = cli("exo-legacy", "--plan", str(plan_file(tmp_path)), "--", "--node-id", "mini")
    assert cp.returncode == 2
    assert "Traceback" not in cp.stderr
    assert cp.stderr.strip().count("\n") == 0 and "legacy exo is not installed" in cp.stderr
    assert "pip install" in cp.stderr


def test_bad_inputs_are_one_line(tmp_path):
    for args in (["compare", str(tmp_path / "nope.json")],
                 ["strategy-check"],
                 ["place", "--plan", str(tmp_path / "nope.json")],
                 ["strategy-check", "--plan", str(plan_file(tmp_path)), "--node", "x"]):
        cp = cli(*args)
        assert cp.returncode == 2, (args, cp.stderr)
        assert "Traceback" not in cp.stderr and cp.stderr.startswith("error:"), cp.stderr


# ------------------------------------------------------------------ a legacy-exo-shaped package
# Same module layout and the same construction as legacy exo's main.py (module-level parse of
# sys.argv, `partitioning_strategy=RingMemoryWeightedPartitioningStrategy()` at import, `run()`),
# written for this test: it prints the partitions the node would use for a fixed topology.

FAKE = {
    "exo/__init__.py": "",
    "exo/topology/__init__.py": "",
    "exo/topology/partitioning_strategy.py": """
        from abc import ABC, abstractmethod
        from dataclasses import dataclass
        @dataclass
        class Partition:
            node_id: str
            start: float
            end: float
        class PartitioningStrategy(ABC):
            @abstractmethod
            def partition(self, topology): ...
    """,
    "exo/topology/device_capabilities.py": """
        from dataclasses import dataclass
        @dataclass(kw_only=True)  # exo's are pydantic models: keywords only
        class DeviceFlops:
            fp32: float
            fp16: float
            int8: float
        @dataclass(kw_only=True)
        class DeviceCapabilities:
            model: str
            chip: str
            memory: int
            flops: DeviceFlops
    """,
    "exo/topology/topology.py": """
        class Topology:
            def __init__(self):
                self.nodes = {}
            def update_node(self, node_id, caps):
                self.nodes[node_id] = caps
            def all_nodes(self):
                return self.nodes.items()
    """,
    "exo/topology/ring_memory_weighted_partitioning_strategy.py": """
        from exo.topology.partitioning_strategy import PartitioningStrategy, Partition
        class RingMemoryWeightedPartitioningStrategy(PartitioningStrategy):
            def partition(self, topology):
                nodes = sorted(topology.all_nodes(), key=lambda x: (x[1].memory, x[0]), reverse=True)
                total = sum(c.memory for _, c in nodes)
                out, start = [], 0
                for nid, c in nodes:
                    end = round(start + c.memory / total, 5)
                    out.append(Partition(nid, start, end))
                    start = end
                return out
    """,
    "exo/main.py": """
        import argparse, json, sys
        from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy
        from exo.topology.topology import Topology
        from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
        parser = argparse.ArgumentParser()
        parser.add_argument("--node-id")
        args = parser.parse_args()
        strategy = RingMemoryWeightedPartitioningStrategy()
        def caps(mem):
            return DeviceCapabilities(model="Mac", chip="M", memory=mem,
                                      flops=DeviceFlops(fp32=0, fp16=0, int8=0))
        def run():
            topo = Topology()
            topo.update_node("studio", caps(65536))
            topo.update_node("mini", caps(16384))
            parts = strategy.partition(topo)
            print(json.dumps({"node": args.node_id, "strategy": type(strategy).__name__,
                              "parts": [[p.node_id, p.start, p.end] for p in parts]}))
    """,
}


@pytest.fixture
def fake_exo(tmp_path):
    root = tmp_path / "fake_exo"
    for rel, text in FAKE.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    return {"PYTHONPATH": f"{root}{os.pathsep}{ROOT}"}


def test_launcher_runs_exo_with_the_measured_strategy(tmp_path, fake_exo):
    cp = cli("exo-legacy", "--plan", str(plan_file(tmp_path)), "--", "--node-id", "mini",
             env=fake_exo)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    assert out["node"] == "mini" and out["strategy"] == "MeasuredPartitioningStrategy"
    from exo_bridge.exo_types import Partition
    from exo_bridge.exo_legacy.strategy import exo_map_stages

    parts = [Partition(*p) for p in out["parts"]]
    assert [(s.node, s.start_layer, s.end_layer) for s in exo_map_stages(parts, 32)] == \
        [("mini", 0, 12), ("studio", 12, 32)]


def test_one_line_change_uses_exo_types_and_env(tmp_path, fake_exo):
    code = textwrap.dedent("""
        import json
        from exo_bridge.exo_types import EXO_INSTALLED
        from exo_bridge.exo_legacy.strategy import strategy_from_env as RingMemoryWeightedPartitioningStrategy
        from exo.topology.partitioning_strategy import PartitioningStrategy, Partition
        from exo.topology.topology import Topology
        from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
        def caps(mem):
            return DeviceCapabilities(model="Mac", chip="M", memory=mem,
                                      flops=DeviceFlops(fp32=0, fp16=0, int8=0))
        s = RingMemoryWeightedPartitioningStrategy()
        t = Topology()
        t.update_node("studio", caps(65536))
        t.update_node("mini", caps(16384))
        parts = s.partition(t)
        print(json.dumps({"installed": EXO_INSTALLED, "isexo": isinstance(s, PartitioningStrategy),
                          "partcls": all(type(p) is Partition for p in parts),
                          "name": type(s).__name__, "order": [p.node_id for p in parts]}))
    """)
    env = dict(os.environ, **fake_exo, EXO_BRIDGE_PLAN=str(plan_file(tmp_path)))
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=60)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    assert out == {"installed": True, "isexo": True, "partcls": True,
                   "name": "MeasuredPartitioningStrategy", "order": ["mini", "studio"]}
    env.pop("EXO_BRIDGE_PLAN")  # unset: exo's own strategy, as before the change
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=60)
    assert json.loads(cp.stdout)["name"] == "RingMemoryWeightedPartitioningStrategy"


def test_run_delegates_to_the_runner():
    pytest.importorskip("exo_bridge.runner.run")
    cp = cli("run", "--help")
    assert cp.returncode == 0, cp.stderr
    assert "exo-bridge run" in cp.stdout or "usage" in cp.stdout


def test_compare_repredicts_at_the_plans_decode_batch(tmp_path):
    """A throughput plan's workload carries its decode batch: --repredict charges that batch
    (before the fix it re-predicted at batch 1, ignoring the serving pattern)."""
    from costtables import make_table, write_cluster

    from exo_bridge.compare import splits
    from graphsplit.cluster import load_cluster
    from graphsplit.costmodel import Workload, predict
    from graphsplit.plan import read_plan

    tables = {"studio": make_table("studio", 32, decode_s=0.001, memory_usable=48 * GIB),
              "mini": make_table("mini", 32, decode_s=0.004, memory_usable=12 * GIB)}
    cfile = write_cluster(tmp_path, tables)
    p = plan_file(tmp_path, str(cfile), baselines=False)
    d = json.loads(p.read_text())
    d.update(runtime="mlx-pipeline", workload={"prompt_tokens": 64, "context_tokens": 128,
                                               "streams": 8, "batch": 4})
    p.write_text(json.dumps(d))
    plan = read_plan(p)
    got = next(s for s in splits(plan, repredict=True) if s.key == "measured").predicted
    c = load_cluster(cfile)
    at4 = predict(c, plan.stages, Workload(64, 128, 8, batch=4), "mlx-pipeline").to_dict()
    at1 = predict(c, plan.stages, Workload(64, 128, 8), "mlx-pipeline").to_dict()
    assert at4["throughput_tps"] != pytest.approx(at1["throughput_tps"])
    assert got["throughput_tps"] == pytest.approx(at4["throughput_tps"])
    assert got["decode_batch"] == 4
