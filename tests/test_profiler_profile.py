"""Profiling tiny models for real: MLX, timing, files, a killed and resumed process."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from profiler.build import safetensors_bytes, save_model_dir
from profiler.costtable import read_table
from profiler.models import config_hash, resolve_model
from profiler.profile import ProfileOptions, profile_model
from profiler.tiny import tiny_config

FAST = dict(prefill_tokens=[8, 32], decode_context=[32, 128], repeats=2, warmup=1,
            microbench=False)


def _config_file(tmp_path, **kw):
    cfg = tiny_config(**kw)
    p = tmp_path / "tiny-config.json"
    p.write_text(json.dumps(cfg))
    return p


def test_profile_a_builtin_style_config_and_read_it_back(tmp_path):
    spec = resolve_model(str(_config_file(tmp_path, n_layers=3)))
    out = tmp_path / "t.json"
    table = profile_model(spec, ProfileOptions(**FAST), out)
    back = read_table(out)  # the reader accepts it
    assert back.complete and [r.name for r in back.rows] == \
        ["embed", "layers.0", "layers.1", "layers.2", "head"]
    assert back.model.config_hash == config_hash(spec.config)
    assert back.quantization == {"bits": 4, "group_size": 64}  # the exo default
    assert back.dtype in ("float32", "bfloat16")
    for r in back.rows:
        assert len(r.prefill_s) == 2 and len(r.decode_s) == 2
        assert all(t > 0 and math.isfinite(t) for t in r.prefill_s + r.decode_s)
        assert r.weight_bytes > 0 and r.peak_memory_bytes > 0
    blk = back.row("layers.1")
    assert blk.measured_from == "layers.0"  # identical structure: shared
    assert blk.kv_bytes_per_token == 2 * 2 * 16 * 4  # k+v x kv heads x head_dim x float32
    assert blk.activation_bytes_per_token == 64 * 4
    assert table.row("head").kind == "head"


def test_every_layer_measures_each_block_unquantized(tmp_path):
    spec = resolve_model(str(_config_file(tmp_path, n_layers=2)))
    out = tmp_path / "e.json"
    events = []
    t = profile_model(spec, ProfileOptions(**FAST, every_layer=True, bits=0,
                                           dtype="float32"), out, progress=events.append)
    assert [r.measured_from for r in t.blocks()] == ["layers.0", "layers.1"]
    done = [e["name"] for e in events if e["event"] == "row_done"]
    assert done == ["embed", "layers.0", "layers.1", "head"] and events[-1]["event"] == "finish"
    assert t.quantization is None
    # unquantized float32 block: 4 attention + 3 MLP matrices + 2 norms
    h, i, kv = 64, 128, 2 * 16
    assert t.row("layers.0").weight_bytes == 4 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)


@pytest.mark.parametrize("quant", [None, {"bits": 4, "group_size": 64}])
def test_local_dir_profiles_with_its_own_weights(tmp_path, quant):
    d = save_model_dir(tmp_path / "m", tiny_config(n_layers=2), seed=1, quantize=quant)
    spec = resolve_model(str(d))
    assert spec.source == "local"
    t = profile_model(spec, ProfileOptions(**FAST), tmp_path / "l.json")
    assert t.quantization == quant  # a local dir is profiled as stored
    assert t.model.source == "local" and t.dtype == "float32"
    for i in range(2):
        assert t.row(f"layers.{i}").weight_bytes == safetensors_bytes(d, f"model.layers.{i}")
    assert t.row("embed").weight_bytes == safetensors_bytes(d, "model.embed_tokens")
    assert t.row("head").weight_bytes == (safetensors_bytes(d, "model.norm")
                                          + safetensors_bytes(d, "lm_head"))
    assert "real weights" in t.method["weights"]


def test_save_model_dir_loads_with_mlx_lm(tmp_path):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    d = save_model_dir(tmp_path / "q", tiny_config(n_layers=2, tie=True), quantize=4)
    model, config = load_model(d)
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    out = model(mx.array([[1, 2, 3]]))
    assert out.shape == (1, 3, 256)


def test_quantized_local_dir_refuses_other_bits(tmp_path):
    from profiler.errors import UserError

    d = save_model_dir(tmp_path / "q", tiny_config(n_layers=1), quantize=4)
    with pytest.raises(UserError, match="stored 4-bit"):
        profile_model(resolve_model(str(d)), ProfileOptions(**FAST, bits=8), tmp_path / "x.json")


@pytest.mark.slow
def test_self_check_agrees_with_the_rows(tmp_path):
    """End to end vs the sum of rows on a small model whose layers take 10-250 ms, timed with
    the process clock (CPU time: robust to the other processes of a shared 2-core machine).
    Best of three attempts (the table's rows, or the rows re-timed alongside) within 25% for
    prefill and decode: a lost or doubled layer (50% with two layers) fails; the machine's
    noise does not."""
    from profiler.selfcheck import self_check

    spec = resolve_model(str(_config_file(tmp_path, n_layers=2, hidden=1024,
                                          intermediate=2048)))
    t = profile_model(spec, ProfileOptions(prefill_tokens=[32], decode_context=[64], repeats=5,
                                           warmup=2, bits=0, dtype="float32", clock="process",
                                           microbench=False), tmp_path / "s.json")
    assert t.method["clock"] == "process"
    best = {"prefill": 9.0, "decode": 9.0}
    for _ in range(3):
        res = self_check(spec, t)
        assert res.chain_max_abs_diff == pytest.approx(0.0, abs=1e-3)
        for p in res.points:
            assert p.predicted_now_s > 0 and p.measured_s > 0
            best[p.phase] = min(best[p.phase], abs(p.error), abs(p.error_now))
        if best["prefill"] < 0.10 and best["decode"] < 0.10:
            break
    assert best["prefill"] < 0.25 and best["decode"] < 0.25, best


def _cli(*args):
    return [sys.executable, "-m", "profiler.cli", *args]


@pytest.mark.slow
def test_killed_run_resumes(tmp_path):
    cfg = _config_file(tmp_path, n_layers=8, hidden=256, intermediate=512)
    out = tmp_path / "r.json"
    cmd = _cli(str(cfg), "--out", str(out), "--every-layer", "--prefill-tokens", "16,64",
               "--decode-context", "64,256", "--repeats", "3", "--no-microbench")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    rows_before = None
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.exists():
                data = json.loads(out.read_text())
                if len(data["rows"]) >= 3:
                    rows_before = data["rows"]
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert rows_before is not None, "the run never wrote 3 rows"
    partial = read_table(out, allow_partial=True)
    assert not partial.complete and 3 <= len(partial.rows) < 10
    kept = {r.name: r.prefill_s for r in partial.rows}
    with pytest.raises(Exception, match="did not finish"):
        read_table(out)  # a partial table is not usable by the splitter
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stderr and "skipping" in p.stderr
    done = read_table(out)
    assert done.complete and len(done.rows) == 10
    for name, pre in kept.items():  # finished rows were kept, not re-measured
        assert done.row(name).prefill_s == pre
    # the same command again: nothing to do
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "already complete" in p.stderr
    # other options against that file: refused with one line, unless --restart
    p = subprocess.run(cmd[:-1] + ["--repeats", "2", "--prefill-tokens", "8"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--restart" in last
    assert p.stderr.count("error:") == 1


def test_cli_json_output_and_bad_options(tmp_path):
    cfg = _config_file(tmp_path, n_layers=2)
    out = tmp_path / "j.json"
    p = subprocess.run(_cli(str(cfg), "--out", str(out), "--json", "--quiet",
                            "--prefill-tokens", "8", "--decode-context", "16", "--repeats", "2",
                            "--no-microbench"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["complete"] and len(data["rows"]) == 4
    # the table is complete: a rerun with --self-check measures nothing and checks it
    p = subprocess.run([sys.executable, "-m", "profiler", str(cfg), "--out", str(out),
                        "--self-check", "--prefill-tokens", "8", "--decode-context", "16",
                        "--repeats", "2", "--no-microbench"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "already complete" in p.stderr and "self-check" in p.stderr
    assert "predicted ms" in p.stderr and "max |logit diff| 0" in p.stderr
    for bad in (["--prefill-tokens", "64,16"], ["--prefill-tokens", "x"], ["--bits", "7"],
                ["--dtype", "int8"]):
        p = subprocess.run(_cli(str(cfg), "--out", str(tmp_path / "b.json"), *bad),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, (bad, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, bad


def test_settle_idles_after_setup_outside_the_clock(tmp_path):
    """time_fn idles settle_s after the untimed setup and before the clock starts (a CPU quota
    repays the setup's CPU there, not inside the timed run); the table records it."""
    from profiler.measure import time_fn

    events = []
    t = time_fn(lambda: events.append(("run", time.perf_counter())), warmup=0, repeats=3,
                setup=lambda: events.append(("setup", time.perf_counter())), settle_s=0.05)
    assert t.median_s < 0.04  # the idle is not timed
    pairs = [(events[i][1], events[i + 1][1]) for i in range(0, len(events), 2)]
    assert all(events[i][0] == "setup" for i in range(0, len(events), 2))
    assert all(run - setup >= 0.045 for setup, run in pairs)  # but it happens before each run
    spec = resolve_model(str(_config_file(tmp_path, n_layers=1)))
    table = profile_model(spec, ProfileOptions(**FAST, settle_s=0.001), tmp_path / "s.json")
    assert read_table(tmp_path / "s.json").method["settle_s"] == 0.001 == table.method["settle_s"]


def test_short_calls_are_timed_back_to_back():
    """A call shorter than min_sample_s is made up to max_inner times per timed sample (with
    `between` before each but the first, inside the clock); the sample is their mean."""
    from profiler.measure import time_fn

    calls = {"fn": 0, "between": 0, "setup": 0}

    def fn():
        calls["fn"] += 1
        time.sleep(0.02)

    # min_sample_s far above one call, so the inner count is max_inner however loaded the
    # machine is (a 20 ms sleep would have to take 2.5 s to lower it)
    t = time_fn(fn, warmup=1, repeats=3, max_rounds=1, min_sample_s=10.0, max_inner=4,
                setup=lambda: calls.__setitem__("setup", calls["setup"] + 1),
                between=lambda: calls.__setitem__("between", calls["between"] + 1))
    assert t.inner == 4 and calls["fn"] == 1 + 3 * 4 and calls["between"] == 3 * 3
    assert calls["setup"] == 1 + 3
    assert 0.015 < t.median_s < 0.08  # per call (>= 20 ms), not per sample (>= 80 ms)
    one = time_fn(fn, warmup=1, repeats=2, max_rounds=1, min_sample_s=0.001, max_inner=4)
    assert one.inner == 1  # long enough already


def sleeping_blocks(calls: list, seconds: float):
    """block(n): a stand-in block that records (n, tokens) in `calls`, sleeps `seconds` (its
    "compute") and returns its input + 1, for tests of the timing method's call pattern."""
    def block(n):
        def f(h, mask, cache):
            calls.append((n, h.shape[1]))
            time.sleep(seconds)
            return h + 1.0
        return f
    return block


def test_decode_is_timed_per_block_inside_a_chain_of_distinct_blocks():
    """rows.time_chain runs the k blocks as one chain per decode pass (each block once per
    pass, in order, one after the other: the output of one is the input of the next) and
    records the chain's time / k; prefill runs the first block alone."""
    import mlx.core as mx

    from profiler import rows

    calls = []
    block = sleeping_blocks(calls, 0.01)
    m = rows.Method(prefill_tokens=[4], decode_context=[8], warmup=1, repeats=3, max_rounds=1,
                    flush=False, decode_min_sample_s=1.0, decode_max_steps=8)
    pre, dec = rows.time_chain([block(0), block(1), block(2)], [None, None, None], 16,
                               mx.float32, m)
    decode_calls = [n for n, t in calls if t == 1]
    assert decode_calls == [0, 1, 2] * (len(decode_calls) // 3)  # whole chain, in order
    # the cache fill's probe + warm-up + 3 samples, one pass each (not repeated back to back)
    assert len(decode_calls) == 3 * (1 + 1 + 3)
    prefill_calls = [n for n, t in calls if t == 4]
    assert set(prefill_calls) == {0}  # prefill: the first block alone
    assert dec[0].inner == 1 and 0.01 <= dec[0].median_s < 0.03  # per block: 3 sleeps / 3
    assert 0.01 <= pre[0].median_s


def test_short_prefill_passes_are_timed_in_a_chain_of_blocks():
    """rows.prefill_lengths: as many blocks as one pass of pass_s holds by one block's prefill
    (at least 1, at most the chain; pass_s 0: alone); time_chain then runs that many blocks in
    order per prefill pass and records the pass / n (before: always the first block alone)."""
    import mlx.core as mx

    from profiler import rows

    calls = []
    block = sleeping_blocks(calls, 0.02)
    chain = [block(0), block(1), block(2)]
    m = rows.Method(prefill_tokens=[4], decode_context=[8], warmup=1, repeats=3, max_rounds=1,
                    flush=False)
    assert rows.prefill_lengths(chain, [None] * 3, 16, mx.float32, m, 0.0) == [1]
    assert rows.prefill_lengths(chain, [None] * 3, 16, mx.float32, m, 10.0) == [3]
    n = rows.prefill_lengths(chain, [None] * 3, 16, mx.float32, m, 0.05)
    assert n == [2]  # one pass of 0.02-0.025 s: two fit in 0.05 s, three do not
    calls.clear()
    pre, _ = rows.time_chain(chain, [None] * 3, 16, mx.float32, m, n)
    prefill_calls = [k for k, t in calls if t == 4]
    assert prefill_calls == [0, 1] * 4  # warm-up + 3 samples, blocks 0 then 1 each pass
    assert 0.02 <= pre[0].median_s < 0.04  # per block: the pass / 2


def test_profile_times_decode_in_a_chain_of_the_models_own_blocks(tmp_path, monkeypatch):
    """profile_model hands rows.time_chain the measured block and the next blocks of the same
    structure, each with its own (distinct) weights, up to chain_blocks; the table says so."""
    import mlx.core as mx

    from profiler import rows

    seen = []
    real = rows.time_chain

    def spy(blocks, templates, *a, **kw):
        w = [b.mlp.down_proj.scales if hasattr(b.mlp.down_proj, "scales")
             else b.mlp.down_proj.weight for b in blocks]
        seen.append((len(blocks), [float(mx.sum(mx.abs(x))) for x in w]))
        return real(blocks, templates, *a, **kw)

    monkeypatch.setattr(rows, "time_chain", spy)
    spec = resolve_model(str(_config_file(tmp_path, n_layers=5)))
    table = profile_model(spec, ProfileOptions(**FAST, chain_blocks=3), tmp_path / "c.json")
    assert [k for k, _ in seen] == [3]  # one structure: one chain of 3 measures all 5 blocks
    sums = seen[0][1]
    assert len(set(sums)) == 3  # distinct weights, not one block three times
    assert table.method["chain_blocks"] == 3
    assert [r.measured_from for r in table.rows if r.kind == "block"] == ["layers.0"] * 5
    assert read_table(tmp_path / "c.json").method["chain_blocks"] == 3
    # prefill: per prefill length, the first n of that chain (short passes), recorded
    n = table.method["prefill_chain_blocks"]["layers.0"]
    assert len(n) == len(FAST["prefill_tokens"]) and all(1 <= k <= 3 for k in n)
    assert table.method["prefill_chain_s"] == rows.PREFILL_CHAIN_PASS_S
    alone = profile_model(spec, ProfileOptions(**FAST, chain_blocks=1), tmp_path / "a.json")
    assert alone.method["chain_blocks"] == 1 and [k for k, _ in seen] == [3, 1]
    assert alone.method["prefill_chain_s"] == 0.0
    assert alone.method["prefill_chain_blocks"]["layers.0"] == [1, 1]
