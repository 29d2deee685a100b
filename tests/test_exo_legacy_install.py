"""The stand-alone strategy for legacy exo's environment: what the wheel holds, that it runs on the
standard library alone (python -S: no site-packages at all), that it re-plans through the
toolkit's Python, and `exo-bridge exo-legacy install` refusing bad input in one line.
The full proof in a venv with exo's pins is tests/test_exo_legacy_env.py (slow, needs PyPI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from costtables import studio_mini_air_tables, write_cluster
from exo_bridge.exo_legacy.install import DIST, PACKAGE, EnvState, build_wheel, changes
from exo_bridge.exo_legacy.strategy import MeasuredPartitioningStrategy
from exo_bridge.exo_types import make_topology
from graphsplit.plan import Plan, Stage, write_plan

ROOT = Path(__file__).resolve().parents[1]

# exo's Topology / DeviceCapabilities shape (exo/topology/topology.py at e4238f9), in the test
RUN_STANDALONE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from exo_measured_split import MeasuredPartitioningStrategy, EXO_INSTALLED
class Caps:
    def __init__(self, memory): self.memory = memory
class Topology:
    def __init__(self): self.nodes = {}
    def update_node(self, node_id, caps): self.nodes[node_id] = caps
    def all_nodes(self): return self.nodes.items()
topo = Topology()
for spec in sys.argv[3:]:
    node, mem = spec.split(":")
    topo.update_node(node, Caps(int(mem)))
s = MeasuredPartitioningStrategy(plan=sys.argv[2], warn=lambda m: None)
parts = s.partition(topo)
print(json.dumps({"exo": EXO_INSTALLED, "source": s.last_decision.source,
                  "parts": [[p.node_id, p.start, p.end] for p in parts],
                  "toolkit": sorted(m for m in sys.modules
                                    if m.split(".")[0] in ("graphsplit", "profiler", "exo_bridge",
                                                           "numpy", "scipy", "mlx"))}))
"""


def _plan(tmp_path) -> Path:
    cluster = write_cluster(tmp_path, studio_mini_air_tables())
    plan = Plan(model={"name": "toy", "n_layers": 32, "config_hash": "sha256:toy"},
                stages=[Stage("studio", 0, 20), Stage("air", 20, 32)], runtime="exo-legacy",
                workload={"prompt_tokens": 64, "context_tokens": 128, "streams": 1},
                cluster_file=cluster.name)
    return write_plan(plan, tmp_path / "plan.json")


def _unpacked(tmp_path, installed) -> Path:
    wheel = build_wheel(tmp_path, installed)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    return tmp_path / "site"


def test_wheel_has_no_dependencies_and_only_the_strategy(tmp_path):
    wheel = build_wheel(tmp_path, None)
    with zipfile.ZipFile(wheel) as z:
        names = sorted(z.namelist())
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert [n for n in names if not n.startswith(DIST.replace("-", "_") + "-")] == [
        f"{PACKAGE}/{m}" for m in ("__init__.py", "__main__.py", "_exo_rules.py", "launch.py",
                                   "strategy.py")]
    assert f"Name: {DIST}" in meta and "Requires-Dist" not in meta
    assert build_wheel(tmp_path / ".." / tmp_path.name, None).read_bytes() == wheel.read_bytes()


def test_standalone_strategy_runs_on_the_standard_library_alone(tmp_path):
    """python -S: no site-packages, so nothing but the standard library can be imported."""
    site = _unpacked(tmp_path, None)
    plan = _plan(tmp_path)
    cp = subprocess.run([sys.executable, "-I", "-S", "-c", RUN_STANDALONE, str(site), str(plan),
                         "studio:65536", "air:8192"], capture_output=True, text=True, timeout=60,
                        env={"PATH": os.environ["PATH"]})
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    assert out["exo"] is False and out["toolkit"] == [] and out["source"] == "plan"
    toolkit = MeasuredPartitioningStrategy(plan=str(plan), warn=lambda m: None)
    want = toolkit.partition(make_topology({"studio": 65536, "air": 8192}))
    assert out["parts"] == [[p.node_id, p.start, p.end] for p in want]


def test_standalone_strategy_replans_through_the_toolkits_python(tmp_path):
    """A node the plan lacks: the stand-alone strategy (no toolkit importable) asks the toolkit's
    Python recorded at install, and gets what the toolkit decides in process."""
    site = _unpacked(tmp_path, {"toolkit_python": sys.executable, "toolkit_path": str(ROOT)})
    plan = _plan(tmp_path)
    topo = ["studio:65536", "mini:16384", "air:8192"]
    cp = subprocess.run([sys.executable, "-I", "-S", "-c", RUN_STANDALONE, str(site), str(plan),
                         *topo], capture_output=True, text=True, timeout=300,
                        env={"PATH": os.environ["PATH"]}, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    assert out["source"] == "replan" and out["toolkit"] == []
    toolkit = MeasuredPartitioningStrategy(plan=str(plan), warn=lambda m: None)
    want = toolkit.partition(make_topology({"studio": 65536, "mini": 16384, "air": 8192}))
    assert toolkit.last_decision.source == "replan"
    assert out["parts"] == [[p.node_id, p.start, p.end] for p in want]


def test_changes_names_every_version_change_and_new_pip_problem():
    before = EnvState([3, 11, 7], "/v", {"mlx": "0.21.1", "mlx-lm": "0.21.1", "numpy": "2.0.0"},
                      ["mlx-lm 0.21.1 has requirement mlx>=0.22.0, but you have mlx 0.21.1."])
    same = EnvState([3, 11, 7], "/v", dict(before.dists, **{DIST: "0.1.0"}), before.pip_check)
    assert changes(before, same) == []
    upgraded = EnvState([3, 11, 7], "/v", {"mlx": "0.32.4", "mlx-lm": "0.21.1", DIST: "0.1.0",
                                           "scipy": "1.16.0"},
                        ["exo 0.0.1 has requirement numpy==2.0.0, but you have numpy 2.4.6."])
    assert changes(before, upgraded) == [
        "mlx 0.21.1 -> 0.32.4", "numpy 2.0.0 -> (absent)", "scipy (absent) -> 1.16.0",
        "pip check: exo 0.0.1 has requirement numpy==2.0.0, but you have numpy 2.4.6."]


def _one_line(cp, *needles):
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_install_refuses_bad_input_in_one_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "exo_bridge.cli", "exo-legacy", "install",
                               *args], capture_output=True, text=True, timeout=120, cwd=ROOT)

    _one_line(cli(), "--python is required")
    _one_line(cli("--python", str(tmp_path / "nope" / "python")), "--python", "cannot run it")
    _one_line(cli("--wheel-out", str(tmp_path / "nodir")), "--wheel-out", "not a directory")
    _one_line(cli("--bogus"), "unrecognized arguments")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "v")],
                   check=True, timeout=120)
    _one_line(cli("--python", str(tmp_path / "v" / "bin" / "python")), "has no pip")
    cp = cli("--wheel-out", str(tmp_path))
    assert cp.returncode == 0
    assert Path(cp.stdout.strip()).name == f"{DIST.replace('-', '_')}-0.1.0-py3-none-any.whl"


def test_install_refuses_and_rolls_back_when_the_strategy_would_pull_in_the_toolkit(tmp_path):
    """An environment where the toolkit is importable (a .pth file): the installed strategy would
    run on the toolkit's modules, not stand alone; the installer refuses and uninstalls it."""
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "toolkit.pth").write_text(str(ROOT) + "\n")
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.cli", "exo-legacy", "install",
                         "--python", str(py)], capture_output=True, text=True, timeout=300,
                        cwd=ROOT)
    _one_line(cp, "refused, importing it pulled in graphsplit", "uninstalled again")
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True,
                            text=True, check=True).stdout
    assert DIST not in {d["name"] for d in json.loads(listed)}
