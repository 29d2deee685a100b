"""A stage process that dies is one line naming the rank, its node, its last error and a kept log;
the other ranks (blocked on the dead one) are stopped at once, not waited for.

Real crashes: a worker that raises (a model directory without weights: every rank's mlx-lm load
fails) and a worker killed by SIGKILL in the middle of the run (as the kernel's OOM killer does),
its peer left waiting on the ring. A real `exo-bridge run` subprocess checks the whole line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")

from exo_bridge.runner.run import RunError, model_spec, run_stages  # noqa: E402
from graphsplit.plan import Stage  # noqa: E402
from profiler.tiny import tiny_config  # noqa: E402

LINE = re.compile(r"rank (\d) \(node (\w+), .*\) failed: (.+); full log: (\S+)$")


def _broken_dir(tmp_path: Path) -> Path:
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(tiny_config(n_layers=4)))  # no weights
    return bad


def test_a_worker_that_raises_is_one_line_with_its_log(tmp_path):
    spec = model_spec(str(_broken_dir(tmp_path)), None)
    with pytest.raises(RunError) as e:
        run_stages([Stage("a", 0, 2), Stage("b", 2, 4)], spec, 4, 2, timeout_s=120)
    msg = str(e.value)
    m = LINE.match(msg)
    assert m and "\n" not in msg, msg
    rank, node, why, log = m.groups()
    assert node == {"0": "a", "1": "b"}[rank]
    assert "Traceback" not in why and why.strip()  # the last line of the traceback, not all
    text = Path(log).read_text()
    assert "Traceback" in text and why in text  # the full stderr is kept where the line says


def test_a_rank_killed_mid_run_stops_its_peer(tmp_path):
    """Rank 1 is started by a shell that SIGKILLs the worker, then itself, a second in: rank 0,
    blocked on the ring, must be stopped by the runner long before the run's timeout."""
    from profiler.build import save_model_dir

    model = save_model_dir(tmp_path / "tiny", tiny_config(n_layers=4))
    spec = model_spec(str(model), None)
    killer = ["sh", "-c", '"$@" & p=$!; sleep 1; kill -9 $p; kill -9 $$', "sh"]
    with pytest.raises(RunError) as e:
        run_stages([Stage("a", 0, 2), Stage("b", 2, 4)], spec, 4, 50, timeout_s=300,
                   wrappers=[[], killer], warmup_prompt=2000)
    msg = str(e.value)
    m = LINE.match(msg)
    assert m, msg
    assert m.group(1) == "1" and m.group(2) == "b" and "killed by SIGKILL" in m.group(3)
    assert Path(m.group(4)).exists()


def test_cli_crash_is_one_line_exit_2(tmp_path):
    from graphsplit.plan import Plan, write_plan

    bad = _broken_dir(tmp_path)
    plan = Plan(model={"name": "broken", "n_layers": 4, "path": str(bad)},
                stages=[Stage("a", 0, 2), Stage("b", 2, 4)], predicted={})
    write_plan(plan, tmp_path / "plan.json")
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.cli", "run", str(tmp_path / "plan.json"),
                         "--prompt-tokens", "4", "--max-tokens", "2", "--timeout", "120"],
                        capture_output=True, text=True, timeout=200)
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()  # progress ("running plan: ...") then the error
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert "Traceback" not in cp.stderr and len(errors) == 1 and errors[0] == lines[-1], cp.stderr
    assert LINE.match(errors[0][len("error: "):]), errors[0]
