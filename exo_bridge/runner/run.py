"""`exo-bridge run PLAN`: run a split for real on MLX's distributed runtime and measure it.

One process per plan stage (`exo_bridge.runner.stage_worker`), joined by the `mx.distributed` ring
backend (`MLX_HOSTFILE` + `MLX_RANK`, started here with `sys.executable`; or `mlx.launch` over ssh
with a hostfile of remote hosts). Each process loads only its layer range; rank 0 embeds, the
last rank applies norm + head, samples greedily and sends the token id back to rank 0.

Measured: time to first token (prefill of `--prompt-tokens` random token ids + the first token),
time per output token over `--max-tokens` tokens, tokens/s (= 1 / TPOT for one stream), printed
beside the plan's prediction with the error in percent. `--stages-from` picks the plan's own
stages or one of its baselines (exo-legacy, exo-current, even), so exo's default splits run the
same way; `all` runs them one after another. `--protocol` picks the per-token protocol the
ranks execute (default: the plan's runtime's): `ring` (ours), `exo-legacy` (the same pattern with
every message framed as legacy exo's gRPC carries it: numpy bytes + shape + dtype, the token id
back as a (1, 1) tensor) or `exo-current` (every rank embeds, runs its blocks, sends on; the last
hidden state is all-gathered to every rank each decode step and every rank runs norm + head +
sampling; exo's prefill: prompt[:-1], prompt[-1], trim 2, barrier, re-decode the last two);
predictions are re-derived under that runtime's cost model.

Library use (the testbed and the benchmark): `run_stages(...)` with per-rank hosts and command
wrappers (e.g. `ip netns exec NODE ...` + a cgroup) returns a `RunResult`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exo_bridge.runner.stage_worker import RESULT_TAG, encode_job
from exo_bridge.runner.streams import (DEFAULT_MAX_BATCH, PATTERNS, ServeResult,
                                       ms_text, pct_errors, pct_text, stream_prompts)
from exo_bridge.runner.tensor import hybrid_layout, is_hybrid, job_groups
from graphsplit.manual import apply_layers
from graphsplit.plan import (Plan, Stage, check_stages, read_plan, stage_dict,
                             stages_from_json)
from profiler import fields as F
from profiler import options as o
from profiler.errors import UserError, guard

BASELINES = ("exo-legacy", "exo-current", "even")
# --protocol -> the runtime whose cost model charges it (graphsplit.costmodel.protocol)
PROTOCOL_RUNTIME = {"ring": "mlx-pipeline", "exo-legacy": "exo-legacy",
                    "exo-current": "exo-current"}
RUNTIME_PROTOCOL = {v: k for k, v in PROTOCOL_RUNTIME.items()}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_TOKENS = 1 << 20  # --prompt-tokens / --max-tokens
MAX_TIMEOUT_S = 7 * 86400.0
MAX_STREAMS = 4096


class RunError(UserError):
    """A distributed run that failed: which rank, why, and the tail of its stderr."""


@dataclass
class RunResult:
    label: str  # plan | exo-legacy | exo-current | even
    stages: list[Stage]
    prompt_tokens: int
    max_tokens: int
    tokens: list[int]
    ttft_s: float
    tpot_s: float | None
    tokens_per_s: float | None
    predicted: dict[str, Any] = field(default_factory=dict)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    protocol: str = "ring"

    def errors_pct(self) -> dict[str, float | None]:
        """(measured - predicted) / predicted in percent, for tpot, ttft and tokens/s."""
        return pct_errors({"tpot_s": self.tpot_s, "ttft_s": self.ttft_s,
                           "throughput_tps": self.tokens_per_s}, self.predicted)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = [stage_dict(s) for s in self.stages]
        d["error_pct"] = self.errors_pct()
        d["breakdown"] = breakdown(self)
        return d


# ------------------------------------------------------------------------- model and plan


def model_spec(model: str | None, plan: Plan | None, dtype: str = "float32",
               seed: int = 0) -> dict[str, Any]:
    """The worker's model spec: a local directory, or a built-in name resolved by the profiler."""
    name = model or (plan.model.get("path") or plan.model.get("name") if plan else None)
    if not name:
        raise UserError("no model: give --model NAME_OR_DIR (the plan names none)")
    p = Path(name).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.exists():
            raise UserError(f"model directory {p} has no config.json")
        from profiler.models import _read_config  # read_json + the config field checks

        return {"source": "dir", "path": str(p.resolve()), "name": p.name,
                "config": _read_config(cfg)}
    try:
        from profiler.models import resolve_model
    except ImportError:
        raise UserError(f"model {name!r} is not a directory and the built-in model list "
                        "(profiler.models) is not available; pass a model directory") from None
    spec = resolve_model(name)
    if getattr(spec, "path", None) and Path(spec.path).is_dir():
        return {"source": "dir", "path": str(Path(spec.path).resolve()), "name": spec.name,
                "config": dict(spec.config)}
    return {"source": "builtin", "name": spec.name, "config": dict(spec.config),
            "dtype": dtype, "seed": seed}


def pick_stages(plan: Plan, which: str) -> tuple[list[Stage], dict[str, Any]]:
    """The stages and prediction of the plan itself or of one of its baselines."""
    if which == "plan":
        return plan.stages, dict(plan.predicted)
    b = plan.baselines.get(which)
    if not b:
        have = ", ".join(plan.baselines) or "none"
        if which == "optimal":
            raise UserError("--stages-from optimal: the plan records no optimum beside its "
                            "split (only a manual plan does: split-model CLUSTER --layers SPEC "
                            f"--out PLAN; this one has: {have})")
        raise UserError(f"the plan has no baseline {which!r} (it has: {have}); re-run split-model")
    if not b.get("stages") and b.get("error"):
        raise UserError(f"--stages-from {which}: the plan has no such split to run: "
                        f"{b['error']}")
    stages = stages_from_json(b.get("stages"), f"baseline {which}")
    check_stages(stages, plan.n_layers, f"baseline {which}")
    return stages, dict(b.get("predicted", {}))


def run_workload(plan: Plan, prompt_tokens: int, max_tokens: int):
    """(cluster, Workload) of this run when the plan's cluster file is here, else None.

    A run's decode steps see KV contexts from P to P + N - 1: the prediction uses the mean,
    P + N // 2 (decode time is near-linear in context), one stream."""
    if not plan.cluster_file or not Path(plan.cluster_file).exists():
        return None
    from graphsplit.cluster import load_cluster
    from graphsplit.costmodel import Workload
    return load_cluster(plan.cluster_file), Workload(prompt_tokens=prompt_tokens,
                                                      context_tokens=prompt_tokens
                                                      + max_tokens // 2, streams=1)


def repredict(cluster, stages: list[Stage], workload, runtime: str) -> dict[str, Any]:
    from graphsplit.costmodel import predict
    return predict(cluster, stages, workload, runtime).to_dict()


def make_prompt(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """Deterministic pseudo-random prompt ids (time does not depend on the words)."""
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(n)]


def vocab_of(config: dict[str, Any]) -> int:
    v = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not v:
        raise UserError("the model config has no vocab_size")
    return int(v)


# ------------------------------------------------------------------------------- processes


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports on `host` (bound then released: a small race, fine locally)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def write_hostfile(hosts: list[str], ports: list[int], path: Path) -> Path:
    """The ring backend's hostfile: one list of "ip:port" per rank."""
    path.write_text(json.dumps([[f"{h}:{p}"] for h, p in zip(hosts, ports)]))
    return path


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def _last_error_line(path: Path) -> str:
    """The last non-empty line of a rank's stderr (a traceback ends with the exception)."""
    lines = [ln.strip() for ln in _tail(path, 8000).splitlines() if ln.strip()]
    return (lines[-1][:300] if lines else "")


def _death(code: int | None, err: Path) -> str:
    """What killed a rank, in words: its last error line, else its exit code or signal."""
    last = _last_error_line(err)
    if code is not None and code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        how = f"killed by {sig}" + (" (the kernel kills a process out of memory this way)"
                                    if -code == signal.SIGKILL else "")
        return f"{how}" + (f"; last error: {last}" if last else "")
    return last or f"exited with code {code} and no error output"


def _kill(procs: list[subprocess.Popen]) -> None:
    """Terminate every rank (its whole process group), then kill what is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.time() + 3
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()


def launch_local(job: dict[str, Any], hosts: list[str] | None = None,
                 wrappers: list[list[str]] | None = None, timeout_s: float = 600.0,
                 ports: list[int] | None = None, env: dict[str, str] | None = None,
                 hostfiles: list[str] | None = None,
                 names: list[str] | None = None) -> list[dict[str, Any]]:
    """Start one worker per stage on this machine and return each rank's result dict.

    hosts: the ring address of each rank (default 127.0.0.1); wrappers: a command prefix per rank
    (e.g. ["ip", "netns", "exec", "n0"]) that must end by exec-ing the worker; hostfiles: one
    ring hostfile per rank (the testbed routes neighbours through its link relay), replacing the
    shared one built from hosts; names: the plan node of each rank (for messages). If any rank
    dies, the others are killed at once (they would wait for it forever) and RunError is one
    line: "rank N (node X) failed: <its last error line>; full log: PATH", the ranks' whole
    stderr kept in that directory. A run past timeout_s is killed the same way.
    """
    n = len(job["stages"])
    hosts = hosts or ["127.0.0.1"] * n
    if ports is None:
        if all(h in LOCAL_HOSTS for h in hosts):
            ports = free_ports(n)
        else:  # addresses inside namespaces: cannot probe from here; fresh namespaces are empty
            base = random.randint(20000, 60000 - n)
            ports = list(range(base, base + n))
    tmp = Path(tempfile.mkdtemp(prefix="exo-bridge-run-"))
    hostfile = write_hostfile(hosts, ports, tmp / "hostfile.json")
    b64 = encode_job(job)
    procs: list[subprocess.Popen] = []
    outs, errs = [], []
    keep_logs = False
    names = names or [f"rank{r}" for r in range(n)]

    def failed(r: int, why: str) -> RunError:
        nonlocal keep_logs
        keep_logs = True
        return RunError(f"rank {r} (node {names[r]}, {hosts[r]}, layers {job['stages'][r]}) "
                        f"failed: {why}; full log: {errs[r]}")

    try:
        for r in range(n):
            e = dict(os.environ, **(env or {}))
            e.update(MLX_HOSTFILE=str(hostfiles[r] if hostfiles else hostfile), MLX_RANK=str(r))
            if n == 1:
                e.pop("MLX_HOSTFILE"), e.pop("MLX_RANK")
            cmd = (wrappers[r] if wrappers else []) + [
                sys.executable, "-m", "exo_bridge.runner.stage_worker", "--job", b64]
            outs.append(tmp / f"rank{r}.out")
            errs.append(tmp / f"rank{r}.err")
            procs.append(subprocess.Popen(cmd, env=e, stdout=open(outs[r], "wb"),
                                          stderr=open(errs[r], "wb"), stdin=subprocess.DEVNULL,
                                          start_new_session=True))
        deadline = time.time() + timeout_s
        while True:
            codes = [p.poll() for p in procs]
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                # the first seen dead (its peers are blocked on it: stop them now); when several
                # are seen at once, a rank killed by a signal is the cause, not its peers' errors
                r = min(bad, key=lambda i: (codes[i] >= 0, i))
                _kill(procs)
                raise failed(r, _death(codes[r], errs[r]))
            if all(c == 0 for c in codes):
                break
            if time.time() > deadline:
                _kill(procs)
                waiting = [r for r, c in enumerate(codes) if c is None]
                raise failed(waiting[0], f"still running after --timeout {timeout_s:g} s "
                             f"(ranks {waiting} were stopped)"
                             + (f"; last error: {_last_error_line(errs[waiting[0]])}"
                                if _last_error_line(errs[waiting[0]]) else ""))
            time.sleep(0.05)
        results = []
        for r in range(n):
            lines = [ln for ln in outs[r].read_text(errors="replace").splitlines()
                     if RESULT_TAG in ln]
            if not lines:
                raise failed(r, "exited without printing a result")
            results.append(json.loads(lines[-1].split(RESULT_TAG, 1)[1]))
        return results
    finally:
        _kill(procs)
        if keep_logs:  # the message names a log here: keep the ranks' stderr, drop the rest
            errs = []
        for f in list(outs) + list(errs) + [hostfile]:
            try:
                f.unlink()
            except OSError:
                pass
        try:
            tmp.rmdir()
        except OSError:
            pass


def launch_mlx(job: dict[str, Any], hostfile: str, timeout_s: float, python: str | None
               ) -> list[dict[str, Any]]:
    """Remote hosts: `mlx.launch --hostfile FILE --backend ring` (ssh), results from stdout.

    The package must be installed at the same interpreter path on every host (`--python`).
    """
    cmd = [sys.executable, "-m", "mlx._distributed_utils.launch", "--hostfile", hostfile,
           "--backend", job.get("backend", "ring"), "--python", python or sys.executable, "--",
           "-m", "exo_bridge.runner.stage_worker", "--job", encode_job(job)]
    fd, log = tempfile.mkstemp(prefix="exo-bridge-run-mlx-launch-", suffix=".log")
    try:
        with os.fdopen(fd, "w") as err:
            cp = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RunError(f"mlx.launch still running after --timeout {timeout_s:g} s (stopped); "
                       f"full log: {log}") from None
    found = [json.loads(ln.split(RESULT_TAG, 1)[1]) for ln in cp.stdout.splitlines()
             if RESULT_TAG in ln]
    if cp.returncode != 0 or len(found) != len(job["stages"]):
        got = sorted(d["rank"] for d in found)
        missing = [r for r in range(len(job["stages"])) if r not in got]
        raise RunError(f"mlx.launch exited {cp.returncode}; ranks {missing} failed: "
                       f"{_last_error_line(Path(log)) or 'no error output'}; full log: {log}")
    os.unlink(log)
    return sorted(found, key=lambda d: d["rank"])


def launch(job: dict[str, Any], stages: list[Stage], *, hostfile: str | None = None,
           python: str | None = None, hosts: list[str] | None = None,
           wrappers: list[list[str]] | None = None, timeout_s: float = 600.0,
           env: dict[str, str] | None = None, hostfiles: list[str] | None = None,
           names: list[str] | None = None, backend: str = "ring") -> list[dict[str, Any]]:
    """Start the job's ranks (remote hosts or another backend: mlx.launch; else local
    processes) and return each rank's result dict. `names`: the ranks' nodes in world order
    (default one per stage; a hybrid plan has one per tensor-group member)."""
    names = names or [s.node for s in stages]
    if hostfile:
        check_hostfile(hostfile, len(names))
    if backend != "ring":  # MPI / jaccl: started by mlx.launch with a hostfile of hosts
        if not hostfile or _hostfile_is_local(hostfile):
            raise UserError(f"--backend {backend} needs --hostfile with the hosts' addresses "
                            "(mlx.launch starts the ranks); on this machine use --backend ring")
        job["backend"] = backend
    if hostfile and not _hostfile_is_local(hostfile):
        return launch_mlx(job, hostfile, timeout_s, python)
    ports = None
    if hostfile:
        hosts = _hostfile_hosts(hostfile)
        if len(hosts) != len(names):
            raise UserError(f"hostfile {hostfile} has {len(hosts)} hosts for "
                            f"{len(names)} ranks")
        ports = _hostfile_ports(hostfile)
    return launch_local(job, hosts=hosts, wrappers=wrappers, timeout_s=timeout_s, env=env,
                        hostfiles=hostfiles, ports=ports, names=names)


def run_stages(stages: list[Stage], spec: dict[str, Any], prompt_tokens: int, max_tokens: int,
               *, label: str = "plan", predicted: dict[str, Any] | None = None,
               hosts: list[str] | None = None, wrappers: list[list[str]] | None = None,
               hostfile: str | None = None, python: str | None = None,
               timeout_s: float = 600.0, warmup_prompt: int = 8, warmup_tokens: int = 2,
               env: dict[str, str] | None = None, seed: int = 0,
               hostfiles: list[str] | None = None, protocol: str = "ring",
               extra: dict[str, Any] | None = None) -> RunResult:
    """Run one split end to end and measure it; see the module docstring."""
    if max_tokens < 1 or prompt_tokens < 1:
        raise UserError("--prompt-tokens and --max-tokens must be at least 1")
    if protocol not in PROTOCOL_RUNTIME:
        raise UserError(f"--protocol {protocol!r} is not one of {', '.join(PROTOCOL_RUNTIME)}")
    if protocol == "exo-current" and prompt_tokens < 2:
        raise UserError("--protocol exo-current needs --prompt-tokens of at least 2 (exo "
                        "re-decodes the last two prompt tokens)")
    n_layers = int(spec["config"].get("num_hidden_layers") or spec["config"]["n_layers"])
    check_stages(stages, n_layers, label)
    job = {"model": spec, "stages": [[s.start_layer, s.end_layer] for s in stages],
           "prompt": make_prompt(vocab_of(spec["config"]), prompt_tokens, seed),
           "max_tokens": max_tokens, "warmup_prompt": warmup_prompt,
           "warmup_tokens": warmup_tokens, "protocol": protocol}
    names = [s.node for s in stages]
    if is_hybrid(stages):  # tensor groups: one rank per member (exo_bridge.runner.tensor)
        names = hybrid_job(job, stages, spec, protocol, extra or {})
    t0 = time.perf_counter()
    ranks = launch(job, stages, hostfile=hostfile, python=python, hosts=hosts,
                   wrappers=wrappers, timeout_s=timeout_s, env=env, hostfiles=hostfiles,
                   names=names, backend=(extra or {}).get("backend", "ring"))
    wall = time.perf_counter() - t0
    r0 = ranks[0]
    tpot = r0.get("tpot_s")
    return RunResult(label=label, stages=list(stages), prompt_tokens=prompt_tokens,
                     max_tokens=max_tokens, tokens=r0["tokens"], ttft_s=r0["ttft_s"],
                     tpot_s=tpot, tokens_per_s=(1.0 / tpot) if tpot else None,
                     predicted=dict(predicted or {}), ranks=ranks, wall_s=wall,
                     protocol=protocol)


def check_serving(pattern: str, protocol: str, streams: int, micro_batch: int,
                  max_batch: int, prompt_tokens: int) -> None:
    """The combinations a multi-stream run can execute (one line each otherwise)."""
    if pattern not in PATTERNS:
        raise UserError(f"--pattern {pattern!r} is not one of {', '.join(PATTERNS)}")
    if pattern == "micro-batch" and protocol == "exo-current":
        raise UserError("--pattern micro-batch cannot run under --protocol exo-current: its "
                        "all-gather is a barrier every step, so micro-batches never overlap; "
                        "use --pattern batch-through or --protocol ring")
    for name, v in (("--streams", streams), ("--micro-batch", micro_batch),
                    ("--max-batch", max_batch)):
        if not isinstance(v, int) or v < 1:
            raise UserError(f"{name} must be a whole number >= 1, got {v!r}")
    if protocol == "exo-current" and prompt_tokens < 2:
        raise UserError("--protocol exo-current needs --prompt-tokens of at least 2 (exo "
                        "re-decodes the last two prompt tokens)")


def serve_stages(stages: list[Stage], spec: dict[str, Any], prompt_tokens: int,
                 max_tokens: int, streams: int, *, pattern: str = "micro-batch",
                 micro_batch: int = 1, max_batch: int = DEFAULT_MAX_BATCH,
                 label: str = "plan", predicted: dict[str, Any] | None = None,
                 protocol: str = "ring", seed: int = 0, timeout_s: float = 600.0,
                 warmup_prompt: int = 8, warmup_tokens: int = 2, **where) -> ServeResult:
    """Serve `streams` concurrent streams through one split under a batching pattern
    (exo_bridge.runner.streams) and measure every stream. `where`: hosts, wrappers, hostfile,
    python, env, hostfiles as for `launch`. `micro_batch` above `streams` is clamped to it."""
    micro_batch = min(micro_batch, streams)
    check_serving(pattern, protocol, streams, micro_batch, max_batch, prompt_tokens)
    n_layers = int(spec["config"].get("num_hidden_layers") or spec["config"]["n_layers"])
    check_stages(stages, n_layers, label)
    job = {"model": spec, "stages": [[s.start_layer, s.end_layer] for s in stages],
           "serve": True, "prompts": stream_prompts(vocab_of(spec["config"]), prompt_tokens,
                                                    streams, seed),
           "max_tokens": max_tokens, "pattern": pattern, "micro_batch": micro_batch,
           "max_batch": max_batch, "warmup_prompt": warmup_prompt,
           "warmup_tokens": warmup_tokens, "protocol": protocol}
    t0 = time.perf_counter()
    ranks = launch(job, stages, timeout_s=timeout_s, **where)
    wall = time.perf_counter() - t0
    rec = ranks[0]["streams"]
    return ServeResult(label=label, stages=list(stages), pattern=pattern, protocol=protocol,
                       streams=streams, micro_batch=micro_batch, max_batch=max_batch,
                       prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                       tokens=[x["tokens"] for x in rec], times_s=[x["times_s"] for x in rec],
                       predicted=dict(predicted or {}), ranks=ranks, wall_s=wall)


def serve_prediction(cluster, stages: list[Stage], prompt_tokens: int, max_tokens: int,
                     streams: int, runtime: str, pattern: str, micro_batch: int,
                     max_batch: int) -> dict[str, Any]:
    """The cost model's numbers for this multi-stream run: graphsplit.costmodel.predict at the
    run's workload (prompt P, mean decode context P + N // 2, B streams, decode batch = the
    micro-batch, or batch-through's min(B, max batch)), with `source` saying which model.
    Per-stream TPOT = the predicted cycle (one decode step of every served stream)."""
    from graphsplit.batching import PATTERN
    from graphsplit.costmodel import Workload, predict

    batch = micro_batch if pattern == "micro-batch" else min(streams, max_batch)
    wl = Workload(prompt_tokens=prompt_tokens, context_tokens=prompt_tokens + max_tokens // 2,
                  streams=streams, batch=batch)
    p = predict(cluster, stages, wl, runtime).to_dict()
    src = (f"graphsplit.costmodel.predict({runtime}, B={streams}, decode batch {batch}: "
           f"{PATTERN[runtime]} model; ttft = one prompt alone)")
    if pattern != PATTERN[runtime]:
        src += f"; note: this run's pattern is {pattern}"
    if pattern == "batch-through" and streams > max_batch and runtime != "exo-current":
        src += (f"; the model overlaps the {-(-streams // max_batch)} batches, the run "
                "does not (waves)")
    return {"throughput_tps": p.get("throughput_tps"), "tpot_s": p.get("cycle_s"),
            "ttft_s": p.get("ttft_s"), "batch": batch,
            "micro_batches": p.get("micro_batches"), "bottleneck_s": p.get("bottleneck_s"),
            "stage_compute_s": p.get("stage_compute_s"), "source": src}


def check_hybrid(stages: list[Any], spec: dict[str, Any], protocol: str):
    """The world layout of a hybrid plan, or one UserError line saying why it cannot run."""
    if protocol != "ring":
        raise UserError(f"--protocol {protocol}: a plan with tensor-parallel stages runs under "
                        "the ring protocol only (exo's runtimes cannot run unequal shares inside "
                        "a pipeline); use --protocol ring")
    return hybrid_layout(stages, spec["config"])


def hybrid_job(job: dict[str, Any], stages: list[Any], spec: dict[str, Any], protocol: str,
               extra: dict[str, Any]) -> list[str]:
    """Turn `job` into a hybrid one (per-rank layers + `groups`); returns the ranks' nodes in
    world order (stage by stage, each group's members contiguous, its leader first)."""
    layout = check_hybrid(stages, spec, protocol)
    job["stages"] = [[r.start, r.end] for r in layout]
    job["groups"] = job_groups(layout)
    job.update({k: v for k, v in extra.items() if k in ("collective", "return_logits")})
    return [r.node for r in layout]


def measure_message_overhead(hidden: int, repeats: int = 50, dtype: str = "float32", *,
                             hosts: list[str] | None = None,
                             wrappers: list[list[str]] | None = None,
                             hostfiles: list[str] | None = None,
                             timeout_s: float = 120.0) -> dict[str, Any]:
    """exo-legacy's per-message overhead between two ranks, measured: a ping-pong of one decode
    activation and a token id, alternately over the ring protocol and the exo-legacy framing
    (see stage_worker.message_pingpong). Returns rank 0's medians and the overhead in s."""
    job = {"kind": "message-pingpong", "stages": [[0, 0], [0, 0]], "hidden": int(hidden),
           "repeats": int(repeats), "dtype": dtype}
    return launch_local(job, hosts=hosts, wrappers=wrappers, hostfiles=hostfiles,
                        timeout_s=timeout_s)[0]


def _hostfile_entries(path: str) -> list[Any]:
    from exo_bridge.formats import read_hostfile  # checked field by field, special files refused

    return read_hostfile(path)


def _hostfile_hosts(path: str) -> list[str]:
    """Hosts of a hostfile: ring format [["ip:port"], ...] or mlx.launch's [{"ssh", "ips"}]."""
    out = []
    for e in _hostfile_entries(path):
        if isinstance(e, list):
            out.append(str(e[0]).rsplit(":", 1)[0])
        elif isinstance(e, dict):
            out.append(str((e.get("ips") or [e.get("ssh")])[0]))
        else:
            out.append(str(e).rsplit(":", 1)[0] if ":" in str(e) else str(e))
    return out


def check_hostfile(path: str, n_stages: int) -> None:
    """One entry per stage; each entry is checked field by field by `formats.read_hostfile`
    (ring "ip:port" with a port 1..65535, or mlx.launch's {"ssh", "ips"})."""
    entries = _hostfile_entries(path)
    if len(entries) != n_stages:
        raise UserError(f"hostfile {path} has {len(entries)} hosts for {n_stages} stages; give "
                        "one entry per stage")


def _hostfile_ports(path: str) -> list[int] | None:
    """The ports of a ring hostfile's entries ("ip:port"); None when any entry has none."""
    out = []
    for e in _hostfile_entries(path):
        first = str(e[0]) if isinstance(e, list) and e else str(e)
        host, _, port = first.rpartition(":")
        if not host or not port.isdigit():
            return None
        out.append(int(port))
    return out


def _hostfile_is_local(path: str) -> bool:
    return all(h in LOCAL_HOSTS for h in _hostfile_hosts(path))


# ---------------------------------------------------------------------------------- report


_ms, _pct = ms_text, pct_text  # "-" for None; milliseconds with one decimal; signed percent


def format_table(results: list[RunResult]) -> str:
    """Measured against predicted per split: TPOT / TTFT in ms, tokens/s, errors in percent."""
    head = ("split", "stages", "tpot ms", "pred", "err", "ttft ms", "pred", "err",
            "tok/s", "pred", "err")
    rows = [head]
    for r in results:
        e = r.errors_pct()
        p = r.predicted
        st = " ".join(f"{'+'.join(getattr(s, 'members', (s.node,)))}:{s.start_layer}-"
                      f"{s.end_layer}" for s in r.stages)
        tps_p = p.get("throughput_tps")
        rows.append((r.label, st, _ms(r.tpot_s), _ms(p.get("tpot_s")), _pct(e["tpot_s"]),
                     _ms(r.ttft_s), _ms(p.get("ttft_s")), _pct(e["ttft_s"]),
                     "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.2f}",
                     "-" if not tps_p else f"{tps_p:.2f}", _pct(e["throughput_tps"])))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def breakdown(r: RunResult) -> dict[str, Any]:
    """Where the time per token went, measured against the cost model's parts.

    Per stage: measured decode compute (mean over the decode steps, waiting excluded) and
    prefill compute, beside the predicted `stage_compute_s` / `stage_prefill_s`; then the
    measured communication residual (TPOT - sum of the stages' compute) beside the predicted
    links (`stage_link_s`, ring closure included). A compute error points at the profiles (or
    how the node was profiled); a residual error at the links (profile-link, per-message
    overhead of the runtime)."""
    p = r.predicted
    pc, pp, pl = (p.get("stage_compute_s") or {}, p.get("stage_prefill_s") or {},
                  p.get("stage_link_s") or {})
    stages = []
    for s, rk in zip(r.stages, _stage_ranks(r)):
        stages.append({"node": s.node, "layers": [s.start_layer, s.end_layer],
                       "decode_s": _mean(rk.get("decode_compute_s") or []),
                       "pred_decode_s": pc.get(s.node),
                       "prefill_s": rk.get("prefill_compute_s"),
                       "pred_prefill_s": pp.get(s.node), "pred_link_s": pl.get(s.node)})
    comp = sum(x["decode_s"] or 0.0 for x in stages)
    links = sum(x["pred_link_s"] or 0.0 for x in stages) if pl else None
    # exo-current: every rank's own head per decode step; the slowest rank's sets the pace
    heads = [rk.get("head_s") or [] for rk in r.ranks]
    head = max((_mean(h) for h in heads if h), default=None)
    if links is not None and p.get("head_pace_s"):
        links += p["head_pace_s"]
    return {"stages": stages, "measured_compute_s": comp,
            "measured_comm_s": (r.tpot_s - comp) if r.tpot_s else None,
            "pred_compute_s": sum(pc.values()) if pc else None, "pred_comm_s": links,
            "measured_head_s": head, "pred_head_s": p.get("head_pace_s")}


def _stage_ranks(r: RunResult) -> list[dict[str, Any]]:
    """One rank's result per stage: the rank itself, or for a tensor group its last member
    (which ends the stage: its compute includes waiting for the group's all-reduces)."""
    if not any("group_ranks" in rk for rk in r.ranks):
        return r.ranks
    tails = sorted({rk["group_ranks"][-1] for rk in r.ranks})
    return [r.ranks[t] for t in tails]


def format_breakdown(r: RunResult) -> str:
    b = breakdown(r)
    lines = [f"{r.label}: per stage (ms)   decode meas / pred        prefill meas / pred"
             "      link pred"]
    for x in b["stages"]:
        lines.append(f"  {x['node']:<10} [{x['layers'][0]:>3},{x['layers'][1]:>3})  "
                     f"{_ms(x['decode_s']):>8} / {_ms(x['pred_decode_s']):>8}  "
                     f"{_ms(x['prefill_s']):>10} / {_ms(x['pred_prefill_s']):>8}  "
                     f"{_ms(x['pred_link_s']):>8}")
    head = "" if b["measured_head_s"] is None else \
        (f" (of which the slowest rank's head: measured {_ms(b['measured_head_s'])}, predicted "
         f"{_ms(b['pred_head_s'])})")
    lines.append(f"  compute sum {_ms(b['measured_compute_s'])} / {_ms(b['pred_compute_s'])} ms; "
                 f"communication (tpot - compute) {_ms(b['measured_comm_s'])} ms, links "
                 f"predicted {_ms(b['pred_comm_s'])} ms{head}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = o.OneLineParser(prog="exo-bridge run",
                                 description="Run a plan's split on mx.distributed (ring) and "
                                 "print measured TTFT / TPOT / tokens/s beside the prediction.")
    ap.add_argument("plan", type=o.path("plan file"), help="plan JSON from split-model")
    ap.add_argument("--prompt-tokens", type=o.positive_int(MAX_TOKENS), default=None,
                    help="prompt length (default: the plan's workload.prompt_tokens, else 32)")
    ap.add_argument("--max-tokens", type=o.positive_int(MAX_TOKENS), default=16, help="tokens to generate (default 16)")
    ap.add_argument("--model", type=o.text("model name or directory"), default=None,
                    help="model directory or built-in name (default: the plan's model)")
    ap.add_argument("--hostfile", type=o.path("hostfile"), default=None,
                    help="ring hostfile ([[\"ip:port\"], ...] per rank) or mlx.launch hostfile "
                    "for remote hosts; default: every rank on 127.0.0.1")
    ap.add_argument("--python", type=o.path("interpreter"), default=None, help="interpreter on remote hosts (mlx.launch)")
    ap.add_argument("--layers", type=o.text("manual split"), metavar="SPEC",
                    help="replace the plan's stages by a manual split, e.g. studio:20,mini:12 "
                    "(graphsplit.manual.apply_layers)")
    ap.add_argument("--stages-from", default="plan",
                    choices=("plan", "optimal") + BASELINES + ("all",),
                    help="run the plan's stages, one baseline's, the optimum a manual plan "
                    "(split-model --layers) records beside its split, or all of them in turn")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="weights of a built-in model (a directory keeps its own)")
    ap.add_argument("--protocol", default=None, choices=tuple(PROTOCOL_RUNTIME),
                    help="per-token protocol to run: ring (ours: activation on, token id back), "
                    "exo-legacy (the same as legacy exo's numpy messages), exo-current (all-gather "
                    "of the last hidden state, head on every rank); default: the plan's runtime")
    ap.add_argument("--backend", default="ring", choices=("ring", "mpi", "jaccl"),
                    help="mx.distributed backend (default ring; mpi / jaccl through mlx.launch "
                    "and --hostfile; tensor groups use Group.split there, docs/exo-bridge.md)")
    ap.add_argument("--timeout", type=o.seconds(MAX_TIMEOUT_S), default=600.0,
                    help="seconds per run (default 600)")
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    ap.add_argument("--breakdown", action="store_true",
                    help="also print measured per-stage compute against the predicted parts")
    ap.add_argument("--streams", type=o.positive_int(MAX_STREAMS), default=None, metavar="B",
                    help="serve B concurrent streams (distinct prompts of the same length) "
                    "under a batching pattern; default: one stream, or the plan's "
                    "workload.streams with --pattern / --micro-batch / --calibrate")
    ap.add_argument("--pattern", default=None, choices=PATTERNS,
                    help="batch-through (exo-current: one batch of up to --max-batch streams "
                    "crosses all stages, no overlap) or micro-batch (ours: micro-batches fill "
                    "the pipeline); default: the plan's serving.pattern, else by runtime")
    ap.add_argument("--micro-batch", type=o.positive_int(MAX_STREAMS), default=None,
                    metavar="M", help="streams per micro-batch (default: the plan's "
                    "serving.micro_batch, else ceil(B / stages))")
    ap.add_argument("--max-batch", type=o.positive_int(MAX_STREAMS), default=None,
                    metavar="N", help="batch-through's concurrency limit (default: the plan's "
                    f"serving.max_batch, else exo's {DEFAULT_MAX_BATCH})")
    ap.add_argument("--calibrate", action="store_true",
                    help="write the measured stage times beside each node's cost table "
                    "(<table>.calibration.json, used by split-model next time) and re-plan")
    return ap


SERVING = F.Obj({"pattern": F.Str(choices=PATTERNS), "micro_batch": F.Int(gt=0),
                 "max_batch": F.Int(gt=0), "why": F.Str()}, name="an object {pattern, ...}")


def plan_serving(path: str) -> dict[str, Any]:
    """The plan's optional `serving` section (INTERFACES I5), checked field by field."""
    from profiler.files import read_json

    data = read_json(path, f"plan {path}")
    sec = data.get("serving") if isinstance(data, dict) else None
    if sec is None:
        return {}
    try:
        F.check(sec, SERVING, "serving")
    except F.FieldError as e:
        raise UserError(f"plan {path}: {e.path}: {e.problem}; fix that field or write the plan "
                        "again with split-model") from None
    return sec


@guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = read_plan(args.plan)
    if args.layers:
        plan = apply_layers(plan, args.layers)
    spec = model_spec(args.model, plan, dtype=args.dtype)
    P = args.prompt_tokens or int(plan.workload.get("prompt_tokens") or 32)
    which = ["plan", *[b for b in ("optimal",) + BASELINES if b in plan.baselines]] \
        if args.stages_from == "all" else [args.stages_from]
    protocol = args.protocol or RUNTIME_PROTOCOL[plan.runtime]
    runtime = PROTOCOL_RUNTIME[protocol]
    if is_hybrid(plan.stages):  # refuse a plan the runner cannot run before starting anything
        check_hybrid(plan.stages, spec, protocol)
    if args.calibrate or any(x is not None for x in (args.streams, args.pattern,
                                                     args.micro_batch, args.max_batch)):
        if is_hybrid(plan.stages):
            raise UserError("--streams / --pattern / --micro-batch / --max-batch / --calibrate "
                            "serve pipeline plans only; a plan with tensor-parallel stages runs "
                            "one stream: drop those options")
        return main_serve(args, plan, spec, P, which, protocol)
    rewl = run_workload(plan, P, args.max_tokens)
    results = []
    for w in which:
        stages, pred = pick_stages(plan, w)
        if rewl is not None:
            pred = repredict(rewl[0], stages, rewl[1], runtime)
        elif runtime != plan.runtime:
            pred = {}  # the plan predicted another runtime's protocol: nothing to compare
        if not args.json:
            print(f"running {w}: " + ", ".join(f"{s.node}[{s.start_layer},{s.end_layer})"
                                               for s in stages), file=sys.stderr, flush=True)
        results.append(run_stages(stages, spec, P, args.max_tokens, label=w, predicted=pred,
                                  hostfile=args.hostfile, python=args.python,
                                  timeout_s=args.timeout, protocol=protocol,
                                  extra={"backend": args.backend}))
    wl = plan.workload.get("prompt_tokens")
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in results]}, indent=2))
    else:
        print(format_table(results))
        if args.breakdown:
            for r in results:
                print(format_breakdown(r))
        if rewl is not None:
            print(f"predictions re-derived from {plan.cluster_file} for this run's workload "
                  f"(prompt {P}, mean decode context {rewl[1].context_tokens}, 1 stream) "
                  f"under the {runtime} protocol")
        elif wl and int(wl) != P:
            print(f"note: the plan predicted for a {wl}-token prompt; this run used {P} "
                  f"(the plan's cluster file {plan.cluster_file or '(none)'} is not here to "
                  "re-predict)")
    return 0


def serving_options(args, plan: Plan, protocol: str) -> tuple[int, str, int, int]:
    """(streams, pattern, micro_batch, max_batch): the options, else the plan's `serving` and
    workload, else: batch-through under exo-current (its runtime), micro-batch otherwise,
    micro-batch ceil(B / stages), max batch exo's default."""
    sec = plan_serving(args.plan)
    B = args.streams or int(plan.workload.get("streams") or 1)
    pattern = args.pattern or sec.get("pattern") or (
        "batch-through" if protocol == "exo-current" else "micro-batch")
    m = args.micro_batch or sec.get("micro_batch") or -(-B // len(plan.stages))
    return B, pattern, min(int(m), B), int(args.max_batch or sec.get("max_batch")
                                            or DEFAULT_MAX_BATCH)


def main_serve(args, plan: Plan, spec: dict[str, Any], P: int, which: list[str],
               protocol: str) -> int:
    """`exo-bridge run --streams B ...`: every split in `which` serves B streams; the table,
    then (--calibrate) the calibration written and the re-plan."""
    from exo_bridge.runner.streams import print_table

    runtime = PROTOCOL_RUNTIME[protocol]
    B, pattern, m, maxb = serving_options(args, plan, protocol)
    check_serving(pattern, protocol, B, m, maxb, P)
    cluster = None
    if plan.cluster_file and Path(plan.cluster_file).exists():
        from graphsplit.cluster import load_cluster
        cluster = load_cluster(plan.cluster_file)
    elif args.calibrate:
        raise UserError(f"--calibrate needs the plan's cluster file ({plan.cluster_file or 'none'}"
                        " recorded) to find the cost tables; run from where split-model ran or "
                        "write the plan again with split-model")
    results = []
    for w in which:
        stages, _ = pick_stages(plan, w)
        pred = serve_prediction(cluster, stages, P, args.max_tokens, B, runtime, pattern, m,
                                maxb) if cluster is not None else {}
        if not args.json:
            print(f"serving {B} streams ({pattern}, {protocol}) on {w}: " + ", ".join(
                f"{s.node}[{s.start_layer},{s.end_layer})" for s in stages), file=sys.stderr,
                flush=True)
        results.append(serve_stages(stages, spec, P, args.max_tokens, B, pattern=pattern,
                                    micro_batch=m, max_batch=maxb, label=w, predicted=pred,
                                    protocol=protocol, timeout_s=args.timeout,
                                    hostfile=args.hostfile, python=args.python))
    cal = None
    if args.calibrate:
        from exo_bridge.runner.calibrate import calibrate, print_calibration
        objective = plan.objective if plan.objective != "pareto" else (
            "throughput" if B > 1 else "latency")
        cal = calibrate(plan.cluster_file, results[0], runtime, objective)
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in results],
                          **({"calibration": cal} if cal else {})}, indent=2))
        return 0
    src = results[0].predicted.get("source") or (
        f"no prediction: the plan's cluster file {plan.cluster_file or '(none)'} is not here")
    print_table(results, f"{B} streams, {pattern} under the {protocol} protocol, prompt {P} "
                f"(all streams), {args.max_tokens} new tokens",
                "measured on rank 0's clock; tok/s = decode tokens / decoding time; tpot = "
                "median over the streams, spread = (max - min) / median; ttft = median.\n"
                f"pred: {src}")
    if cal:
        print_calibration(cal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
