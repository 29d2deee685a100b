"""Legacy exo keeps working after `exo-bridge exo-legacy install`: a real venv with exo's pins.

exo's setup.py at its last legacy commit (e4238f9) pins, among others, mlx==0.22.0 and
mlx-lm==0.21.1 (Apple silicon), transformers==4.46.3, numpy==2.0.0, pillow==10.4.0,
aiohttp==3.10.11, aiofiles==24.1.0, pydantic==2.9.2, psutil==6.0.0, tqdm==4.66.4,
protobuf==5.28.1, Jinja2==3.1.4, requests==2.32.3. The venv below holds the ones exo's MLX engine
and its topology code import, at exo's versions, with one exception: mlx 0.22.0 has no Linux
wheel on PyPI (its releases for Linux x86_64 jump from 0.21.1 to 0.25.2), so the venv has
mlx 0.21.1, the nearest release that installs here; mlx-lm 0.21.1 declares mlx>=0.22.0, so it is
installed with --no-deps and `pip check` reports that one mismatch before our install (the
installer must leave it exactly as it was). On a Mac the venv would hold exo's exact pins.

The test proves, in that venv: (a) installing the strategy changes no distribution's version and
adds no `pip check` problem; (b) every import exo's MLX engine does at e4238f9 has the same
outcome before and after (all succeed but one that fails in exo's own pinned environment), and
the mlx-lm APIs exo calls still run (a tiny Llama with exo's cache and sampler, mlx-lm's tokenizer
loader on a tokenizer built here); (c) exo's PartitioningStrategy call works with our strategy:
a minimal stand-in of exo's topology modules, written in this test from exo's source, receives
exo-class Partitions whose shards (exo's truncation, indexed by position) are the plan's layers,
and a topology the plan lacks is re-planned through the toolkit's Python.

Needs PyPI the first time (about 60 MB of wheels, pip's cache keeps them); the pristine venv is
cached under ~/.cache/mlx-measured-split/ (MLX_SPLIT_CACHE overrides) and hard-link copied per
run. Measured on this project's shared 2-core VM: 62 s with no cached venv (44 s to build it
from pip's wheel cache, 18 s for the test), about 18 s after (`pytest --durations`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graphsplit.plan import Plan, Stage, write_plan

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# exo's pins (setup.py at e4238f9) that its MLX engine and topology code import
EXO_PINS = {"mlx": "0.21.1",  # exo pins 0.22.0, which has no Linux wheel (module docstring)
            "mlx-lm": "0.21.1", "transformers": "4.46.3", "numpy": "2.0.0",
            "pillow": "10.4.0", "aiohttp": "3.10.11", "aiofiles": "24.1.0",
            "pydantic": "2.9.2", "psutil": "6.0.0", "tqdm": "4.66.4", "protobuf": "5.28.1",
            "jinja2": "3.1.4", "requests": "2.32.3"}
UNPINNED = ["sentencepiece", "pyyaml"]  # mlx-lm 0.21.1's own requirements, unpinned by exo

# the imports of exo's MLX engine at e4238f9 (exo/inference/mlx/*, models/*, tokenizers.py)
ENGINE_IMPORTS = [
    ("sharded_inference_engine.py", "import numpy as np"),
    ("sharded_inference_engine.py", "import mlx.core as mx"),
    ("sharded_inference_engine.py", "import mlx.nn as nn"),
    ("sharded_inference_engine.py", "import mlx.optimizers as optim"),
    ("sharded_inference_engine.py", "from mlx_lm.sample_utils import make_sampler"),
    ("sharded_inference_engine.py", "from mlx_lm.models.cache import make_prompt_cache"),
    ("sharded_utils.py", "from transformers import AutoProcessor"),
    ("sharded_utils.py", "from mlx_lm.tokenizer_utils import load_tokenizer, TokenizerWrapper"),
    ("sharded_utils.py", "from PIL import Image"),
    ("sharded_utils.py", "import aiohttp"),
    ("tokenizers.py", "from transformers import AutoTokenizer, AutoProcessor"),
    ("tokenizers.py", "from aiofiles import os as aios"),
    ("models/base.py", "from mlx_lm.models.cache import KVCache"),
    ("models/llama.py", "from mlx_lm.models.base import create_attention_mask"),
    ("models/llama.py", "from mlx_lm.models.llama import TransformerBlock, ModelArgs"),
    ("models/qwen2.py", "from mlx_lm.models.qwen2 import TransformerBlock, ModelArgs"),
    ("models/phi3.py", "from mlx_lm.models.phi3 import TransformerBlock, ModelArgs"),
    ("models/gemma2.py", "from mlx_lm.models.gemma2 import TransformerBlock, ModelArgs, RMSNorm"),
    ("models/deepseek_v2.py",
     "from mlx_lm.models.deepseek_v2 import ModelArgs, DeepseekV2DecoderLayer"),
    ("models/deepseek_v3.py",
     "from mlx_lm.models.deepseek_v3 import ModelArgs as V3ModelArgs, DeepseekV3DecoderLayer"),
    ("models/llava.py", "from mlx_lm.models.base import BaseModelArgs, KVCache"),
    ("models/sd_models/tokenizer.py", "import regex"),
    ("models/StableDiffusionPipeline.py", "from tqdm import tqdm"),
    ("topology/device_capabilities.py", "from pydantic import BaseModel"),
    ("topology/device_capabilities.py", "import psutil"),
]
# fails in exo's own pinned environment already: mlx-lm 0.21.1's models/base.py has no KVCache
BROKEN_IN_EXO = {"from mlx_lm.models.base import BaseModelArgs, KVCache"}

PROBE_IMPORTS = r"""
import json, sys
out = {}
for stmt in json.loads(sys.argv[1]):
    try:
        exec(stmt, {})
        out[stmt] = "ok"
    except Exception as e:
        out[stmt] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""

# the mlx-lm calls exo's engine makes: a model's prompt cache, its forward, exo's sampler, and
# mlx-lm's tokenizer loader (on a word-level tokenizer built here: no download)
ENGINE_CALLS = r"""
import json, sys, tempfile
from pathlib import Path
import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import load_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2,
                       intermediate_size=64, num_attention_heads=4, rms_norm_eps=1e-5,
                       vocab_size=16, num_key_value_heads=2)
model = llama.Model(args)
cache = make_prompt_cache(model)
logits = model(mx.array([[1, 2, 3]]), cache=cache)
token = make_sampler(0.0, 0.0, 0.0, 1)(logits[:, -1, :])
vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "exo"])}
tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
d = Path(tempfile.mkdtemp())
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
wrapper = load_tokenizer(d)
print(json.dumps({"logits": list(logits.shape), "cache": [c.offset for c in cache],
                  "token": int(token.item()), "ids": wrapper.encode("hello exo world"),
                  "wrapper": type(wrapper).__name__}))
"""

# a minimal stand-in of legacy exo's topology modules, written from exo's source (e4238f9)
FAKE_EXO = {
    "exo/__init__.py": "",
    "exo/inference/__init__.py": "",
    "exo/inference/shard.py": """
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Shard:  # inclusive layer range, as exo's
            model_id: str
            start_layer: int
            end_layer: int
            n_layers: int
    """,
    "exo/topology/__init__.py": "",
    "exo/topology/device_capabilities.py": """
        from pydantic import BaseModel

        class DeviceFlops(BaseModel):
            fp32: float
            fp16: float
            int8: float

        class DeviceCapabilities(BaseModel):  # memory: TOTAL memory in MB
            model: str
            chip: str
            memory: int
            flops: DeviceFlops
    """,
    "exo/topology/topology.py": """
        class Topology:
            def __init__(self):
                self.nodes = {}
                self.peer_graph = {}
                self.active_node_id = None

            def update_node(self, node_id, device_capabilities):
                self.nodes[node_id] = device_capabilities

            def all_nodes(self):
                return self.nodes.items()
    """,
    "exo/topology/partitioning_strategy.py": """
        from abc import ABC, abstractmethod
        from dataclasses import dataclass
        from typing import List
        from exo.inference.shard import Shard
        from exo.topology.device_capabilities import DeviceCapabilities
        from .topology import Topology

        @dataclass
        class Partition:
            node_id: str
            start: float
            end: float

        class PartitioningStrategy(ABC):
            @abstractmethod
            def partition(self, topology: Topology) -> List[Partition]:
                pass

        def map_partitions_to_shards(partitions, num_layers, model_id):
            # truncation; the last partition ends at num_layers - 1; empty shards left out
            shards = []
            for i, p in enumerate(partitions):
                first, last = int(p.start * num_layers), int(p.end * num_layers) - 1
                if i == len(partitions) - 1:
                    last = num_layers - 1
                if first <= last:
                    shards.append(Shard(model_id, first, last, num_layers))
            if shards and shards[-1].end_layer < num_layers - 1:
                shards[-1] = Shard(model_id, shards[-1].start_layer, num_layers - 1, num_layers)
            return shards
    """,
}

# exo's Node.get_current_shard: the node's POSITION in the partitions indexes the shard list
PARTITION_CALL = r"""
import json, os, sys
for stmt in json.loads(sys.argv[1]):  # exo's engine libraries loaded in the same process
    exec(stmt, {})
from exo_measured_split import strategy_from_env as RingMemoryWeightedPartitioningStrategy
from exo.topology.partitioning_strategy import (Partition, PartitioningStrategy,
                                                map_partitions_to_shards)
from exo.topology.topology import Topology
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
s = RingMemoryWeightedPartitioningStrategy()
out = {"is_exo_strategy": isinstance(s, PartitioningStrategy)}
for name, nodes in json.loads(sys.argv[2]).items():
    topo = Topology()
    for node_id, mb in nodes.items():
        topo.update_node(node_id, DeviceCapabilities(model="Mac", chip="M", memory=mb,
                                                     flops=DeviceFlops(fp32=0, fp16=0, int8=0)))
    parts = s.partition(topo)
    shards = map_partitions_to_shards(parts, 32, "llama-3-8b")
    index = {p.node_id: i for i, p in enumerate(parts)}
    out[name] = {"source": s.last_decision.source,
                 "exo_partitions": all(type(p) is Partition for p in parts),
                 "layers": {n: [shards[i].start_layer, shards[i].end_layer + 1]
                            for n, i in index.items()},
                 "order": [p.node_id for p in parts]}
print(json.dumps(out))
"""


def _cache_root() -> Path:
    return Path(os.environ.get("MLX_SPLIT_CACHE") or Path.home() / ".cache" / "mlx-measured-split")


def _pip(python: Path, *args: str) -> None:
    cp = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True,
                        timeout=900)
    if cp.returncode != 0:
        tail = (cp.stderr.strip().splitlines() or ["?"])[-1]
        pytest.fail(f"building the legacy-exo venv needs PyPI: pip {' '.join(args[:2])}: {tail}")


def pristine_venv() -> Path:
    """The cached venv with exo's pins, built once (atomically renamed into place)."""
    spec = {"python": list(sys.version_info[:3]), "pins": EXO_PINS, "unpinned": UNPINNED}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    final = _cache_root() / "legacy-exo-venv" / key
    if (final / "bin" / "python").exists():
        return final
    tmp = final.with_name(f"{key}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, timeout=300)
    py = tmp / "bin" / "python"
    _pip(py, "install", "-q", *[f"{n}=={v}" for n, v in EXO_PINS.items() if n != "mlx-lm"],
         *UNPINNED)
    _pip(py, "install", "-q", "--no-deps", f"mlx-lm=={EXO_PINS['mlx-lm']}")
    tmp.rename(final)
    return final


@pytest.fixture
def exo_venv(tmp_path) -> Path:
    """A private copy of the pristine venv (hard links: pip and Python only add or replace
    files by rename, never write into an existing one)."""
    src, dst = pristine_venv(), tmp_path / "exo-venv"
    cp = subprocess.run(["cp", "-al", str(src), str(dst)], capture_output=True)
    if cp.returncode != 0:
        shutil.copytree(src, dst, symlinks=True)
    return dst


def _clean_env() -> dict:
    """exo's own environment: nothing of ours on PYTHONPATH."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(python: Path, code: str, *args: str, env: dict | None = None) -> dict:
    """Run exo's Python from a neutral directory (`-c` puts the working directory on sys.path,
    and a checkout's *.egg-info there would look like an installed distribution)."""
    cp = subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True,
                        timeout=300, env=env or _clean_env(), cwd=python.parents[2])
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout.strip().splitlines()[-1])


def _dists(python: Path) -> dict:
    return _run(python, "import importlib.metadata as m, json; print(json.dumps(sorted("
                        "[d.metadata['Name'].lower().replace('_', '-'), d.version] "
                        "for d in m.distributions())))")


def _pip_check(python: Path) -> list[str]:
    cp = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True,
                        timeout=120, env=_clean_env(), cwd=python.parents[2])
    return sorted(cp.stdout.strip().splitlines())


def _fake_exo(root: Path) -> Path:
    for rel, text in FAKE_EXO.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    return root


def _plan(tmp_path) -> Path:
    from costtables import GiB, make_table, write_cluster

    tables = {n: make_table(n, 32, decode_s=d, memory_usable=u * GiB, memory_total=2 * u * GiB)
              for n, d, u in (("studio", 0.001, 48), ("mini", 0.004, 12), ("air", 0.008, 6))}
    cluster = write_cluster(tmp_path, tables)
    plan = Plan(model={"name": "toy", "n_layers": 32, "config_hash": "sha256:toy"},
                stages=[Stage("mini", 0, 12), Stage("studio", 12, 32)], runtime="exo-legacy",
                workload={"prompt_tokens": 64, "context_tokens": 128, "streams": 1},
                cluster_file=str(cluster))
    return write_plan(plan, tmp_path / "plan.json")


def test_legacy_exo_env_keeps_its_pins_and_engine_after_install(exo_venv, tmp_path):
    py = exo_venv / "bin" / "python"
    stmts = json.dumps([s for _, s in ENGINE_IMPORTS])
    before = {"dists": _dists(py), "check": _pip_check(py),
              "imports": _run(py, PROBE_IMPORTS, stmts)}
    pins = dict(before["dists"])
    assert {n: pins.get(n) for n in EXO_PINS} == EXO_PINS
    assert before["check"] == ["mlx-lm 0.21.1 has requirement mlx>=0.22.0, but you have mlx "
                               "0.21.1."]
    assert {s for s, r in before["imports"].items() if r != "ok"} == BROKEN_IN_EXO

    fake = _fake_exo(tmp_path / "fake-exo")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}")
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.cli", "exo-legacy", "install",
                         "--python", str(py)], capture_output=True, text=True, timeout=600,
                        env=dict(env, PYTHONPATH=f"{ROOT}{os.pathsep}{fake}"))
    assert cp.returncode == 0, cp.stderr
    assert "distributions unchanged" in cp.stdout
    assert "legacy exo importable there: yes" in cp.stdout

    # (a) nothing of exo's changed; our distribution is the only addition
    after = _dists(py)
    assert [d for d in after if d[0] != "exo-measured-split-strategy"] == before["dists"]
    assert _pip_check(py) == before["check"]
    # (b) exo's MLX engine imports exactly as before, and the mlx-lm calls it makes still run
    assert _run(py, PROBE_IMPORTS, stmts) == before["imports"]
    calls = _run(py, ENGINE_CALLS)
    assert calls["logits"] == [1, 3, 16] and calls["cache"] == [3, 3]
    assert calls["ids"] == [1, 3, 2] and calls["wrapper"] == "TokenizerWrapper"
    # (c) exo's strategy call with our strategy, in exo's process, exo's classes
    topologies = {"planned": {"studio": 65536, "mini": 16384},
                  "grown": {"studio": 65536, "mini": 16384, "air": 8192}}
    exo_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(fake), "HOME": str(tmp_path),
               "EXO_BRIDGE_PLAN": str(_plan(tmp_path))}
    working = json.dumps([s for _, s in ENGINE_IMPORTS if s not in BROKEN_IN_EXO])
    out = _run(py, PARTITION_CALL, working, json.dumps(topologies), env=exo_env)
    assert out["is_exo_strategy"] is True
    planned = out["planned"]
    assert planned["source"] == "plan" and planned["exo_partitions"] is True
    assert planned["order"] == ["mini", "studio"]
    assert planned["layers"] == {"mini": [0, 12], "studio": [12, 32]}
    grown = out["grown"]  # air is not in the plan: re-planned by the toolkit's Python
    assert grown["source"] == "replan" and grown["exo_partitions"] is True
    spans = sorted(grown["layers"].values())
    assert spans[0][0] == 0 and spans[-1][1] == 32
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))

    cp = subprocess.run([sys.executable, "-m", "exo_bridge.cli", "exo-legacy", "install",
                         "--python", str(py), "--uninstall"], capture_output=True, text=True,
                        timeout=600, env=env)
    assert cp.returncode == 0, cp.stderr
    assert _dists(py) == before["dists"]
