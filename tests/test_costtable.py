"""The cost-table format: round trip, atomic writes, and one clear line for every bad table."""

import json
import math
import subprocess
import sys

import pytest

from profiler.costtable import (CostTable, CostTableError, DeviceInfo, LayerRow, ModelInfo,
                                default_path, read_table, write_table)


def _row(name, kind, layer, measured_from=None, t=0.01):
    return LayerRow(name=name, kind=kind, layer=layer, weight_bytes=1000,
                    activation_bytes_per_token=256, kv_bytes_per_token=128 if layer is not None
                    else 0, peak_memory_bytes=5000, prefill_s=[t, 3 * t], prefill_spread=[0.01,
                                                                                     0.02],
                    decode_s=[t / 10, t / 8], decode_spread=[0.05, 0.05],
                    measured_from=measured_from or name)


def make_table(n_layers=3, complete=True) -> CostTable:
    rows = [_row("embed", "embed", None)]
    rows += [_row(f"layers.{i}", "block", i, "layers.0") for i in range(n_layers)]
    rows += [_row("head", "head", None)]
    return CostTable(
        model=ModelInfo(name="tiny", config_hash="sha256:00", n_layers=n_layers, hidden_size=64),
        dtype="float32", quantization={"bits": 4, "group_size": 64},
        device=DeviceInfo(host="h", name="cpu", backend="cpu", mlx_version="0.32.4",
                          memory_total_bytes=2**34, memory_usable_bytes=2**33,
                          memory_bandwidth_gbs=10.0, matmul_tflops=0.01),
        prefill_tokens=[16, 64], decode_context=[64, 256], rows=rows, complete=complete)


def test_round_trip(tmp_path):
    p = write_table(make_table(), tmp_path / "t.json")
    t = read_table(p)
    assert t.complete and len(t.rows) == 5 and t.row("layers.2").measured_from == "layers.0"
    assert t.decode_time(t.row("layers.1"), 64) == pytest.approx(0.001)
    assert t.prefill_time(t.row("layers.1"), 40) == pytest.approx(0.02)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_default_path_names_host_and_model():
    assert str(default_path("my host", "llama-3-8b")) == "data/profiles/my_host--llama-3-8b.json"
    assert default_path("h", "m", "fp").name == "h--m--fp.json"


def _tp_section(times=((1.0, 4.0), (0.1, 0.2)), n=8):
    """A tensor_parallel section of layers 0-2 at shares 2 and 8 (format I2)."""
    rows = []
    for k, scale in ((2, 1.0), (8, 3.0)):
        rows.append({"measured_from": "layers.0", "layers": [0, 1, 2], "kv_heads": k,
                     "mlp_columns": 1024 * k // n, "weight_bytes": 100 * k + 10,
                     "kv_bytes_per_token": 64 * k,
                     "prefill_s": [t * scale for t in times[0]], "prefill_spread": [0.0, 0.0],
                     "decode_s": [t * scale for t in times[1]], "decode_spread": [0.0, 0.0]})
    return {"version": 1, "unit": "kv_head", "n_kv_heads": n, "q_per_kv": 4,
            "grid_kv_heads": [2, 8], "allreduces_per_block": 2,
            "allreduce_bytes_per_token": 256, "rows": rows}


def _mutations():
    def version(d):
        d["version"] = 3

    def missing_row(d):
        d["rows"] = [r for r in d["rows"] if r["name"] != "layers.1"]

    def nan(d):
        d["rows"][2]["decode_s"][0] = math.nan

    def negative(d):
        d["rows"][1]["weight_bytes"] = -5

    def grid_mismatch(d):
        d["grids"]["decode_context"] = [64, 256, 1024]

    def not_increasing(d):
        d["grids"]["prefill_tokens"] = [64, 16]

    def partial(d):
        d["complete"] = False

    def bad_measured_from(d):
        d["rows"][2]["measured_from"] = "layers.9"

    def wrong_format(d):
        d["format"] = "something-else"

    def no_batch_grid(d):
        del d["grids"]["decode_batch"]

    def batch_grid_without_1(d):
        d["grids"]["decode_batch"] = [2]

    def batch_column_not_decode(d):
        d["rows"][1]["decode_batch_s"][0][0] *= 2

    def batch_shape(d):
        d["rows"][3]["decode_batch_s"][1] = [0.1, 0.2]

    def chunk_without_context(d):
        d["grids"]["prefill_chunk"] = [16]

    def tp_share_too_big(d):
        d["tensor_parallel"] = _tp_section()
        d["tensor_parallel"]["rows"][0]["kv_heads"] = 9

    def tp_version(d):
        d["tensor_parallel"] = dict(_tp_section(), version=2)

    def tp_grid_mismatch(d):
        d["tensor_parallel"] = _tp_section()
        d["tensor_parallel"]["rows"][1]["decode_s"] = [0.1]

    return [("version", version, "version 3 is not supported"),
            ("no_batch_grid", no_batch_grid, "grids.decode_batch: is missing"),
            ("batch_grid_without_1", batch_grid_without_1, "does not hold 1"),
            ("batch_column", batch_column_not_decode, "the batch-1 column is decode_s"),
            ("batch_shape", batch_shape, "decode_batch_s: must hold one list of 1 values"),
            ("chunk_context", chunk_without_context, "prefill_chunk and prefill_chunk_context"),
            ("tp_share", tp_share_too_big, "kv_heads: 9 is more than n_kv_heads 8"),
            ("tp_version", tp_version, "tensor_parallel.version 2 is not supported"),
            ("tp_grid", tp_grid_mismatch, "tensor_parallel.rows[1].decode_s: has 1 values"),
            ("missing_row", missing_row, "rows missing: layers.1"),
            ("nan", nan, "rows[2].decode_s[0]: NaN is not a number"),
            ("negative", negative, "rows[1].weight_bytes: must be a number >= 0, got -5"),
            ("grid_mismatch", grid_mismatch, "the grids do not match"),
            ("not_increasing", not_increasing, "not strictly increasing"),
            ("partial", partial, "did not finish"),
            ("measured_from", bad_measured_from, "measured_from: 'layers.9'"),
            ("format", wrong_format, "not a cost table")]


@pytest.mark.parametrize("name,mutate,expect", _mutations(), ids=[m[0] for m in _mutations()])
def test_bad_tables_are_refused_with_one_line(tmp_path, name, mutate, expect):
    d = make_table().to_dict()
    mutate(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))  # allow_nan: a NaN is written as the NaN token
    with pytest.raises(CostTableError) as e:
        read_table(p)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg and str(p) in msg


def test_not_json_and_missing_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(CostTableError, match="not valid JSON"):
        read_table(p)
    with pytest.raises(CostTableError, match="no such file"):
        read_table(tmp_path / "nope.json")


def test_write_refuses_invalid_table(tmp_path):
    t = make_table()
    t.rows[1].prefill_s[0] = -1.0
    with pytest.raises(CostTableError):
        write_table(t, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_partial_table_may_lack_rows(tmp_path):
    t = make_table(complete=False)
    t.rows = t.rows[:2]
    write_table(t, tmp_path / "p.json")
    assert len(read_table(tmp_path / "p.json", allow_partial=True).rows) == 2


@pytest.mark.parametrize("name,mutate,expect",
                         [m for m in _mutations() if m[0] in ("version", "missing_row", "nan",
                                                               "negative", "grid_mismatch")],
                         ids=["version", "missing_row", "nan", "negative", "grid_mismatch"])
def test_profile_model_refuses_a_bad_table_at_out(tmp_path, name, mutate, expect):
    """The CLI reads the table already at --out (to resume it): a bad one is one line on
    stderr, exit code 2, no traceback."""
    from profiler.tiny import tiny_config

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config(n_layers=3)))
    d = make_table().to_dict()
    mutate(d)
    out = tmp_path / "bad.json"
    out.write_text(json.dumps(d))
    p = subprocess.run([sys.executable, "-m", "profiler.cli", str(cfg), "--out", str(out),
                        "--quiet", "--no-microbench"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cost table") and expect in lines[0]


def test_interpolation_inside_and_beyond_the_grid():
    from profiler.costtable import interpolate
    # inside: the straight line between neighbours
    assert interpolate([16, 64], [1.0, 3.0], 40, through_origin=True) == pytest.approx(2.0)
    # beyond: extrapolated with the last slope
    assert interpolate([64, 256], [1.0, 2.0], 1024, through_origin=False) == pytest.approx(6.0)
    # noise that makes the last two points decrease never extrapolates towards zero
    assert interpolate([16, 64], [0.94, 0.83], 1024, through_origin=False) == pytest.approx(0.83)
    assert interpolate([8, 32], [2.0, 1.5], 512, through_origin=True) == pytest.approx(1.5)
    # below the grid: decode keeps the first point, prefill scales towards the origin
    assert interpolate([64, 256], [1.0, 2.0], 1, through_origin=False) == pytest.approx(1.0)
    low = interpolate([16, 64], [1.0, 3.0], 4, through_origin=True)
    assert 0.25 <= low < 1.0


# ------------------------------------------------------------ version 2: batch grid, TP section

def _v2_table(tmp_path):
    """Batch grid [1, 2, 4] at contexts [64, 256]: decode_s [1, 2] ms, batch 2 costs 1.5x and
    batch 4 2.5x; with a tensor_parallel section."""
    t = make_table()
    t.decode_batch = [1, 2, 4]
    for r in t.rows:
        r.decode_s = [0.001, 0.002]
        r.decode_batch_s = [[d, 1.5 * d, 2.5 * d] for d in r.decode_s]
        r.decode_batch_spread = [[0.0, 0.0, 0.0] for _ in r.decode_s]
    t.tensor_parallel = _tp_section()
    return read_table(write_table(t, tmp_path / "v2.json"))


def test_decode_seconds_interpolates_context_then_batch_exactly(tmp_path):
    from profiler.costtable import batch_grid, decode_seconds

    t = _v2_table(tmp_path)
    r = t.row("layers.1")
    assert batch_grid(t) == [1, 2, 4]
    assert decode_seconds(t, r, 64, 1) == 0.001 and decode_seconds(t, r, 256, 4) == 0.005
    assert decode_seconds(t, r, 64, 2) == pytest.approx(0.0015)
    assert decode_seconds(t, r, 64, 3) == pytest.approx(0.002)  # halfway from 2 to 4
    assert decode_seconds(t, r, 160, 3) == pytest.approx(0.003)  # context halfway, too
    # beyond the grid: the last two batch points' slope (2 -> 4: +0.5 ms per stream at 64)
    assert decode_seconds(t, r, 64, 8) == pytest.approx(0.0025 + 4 * 0.0005)
    assert decode_seconds(t, r, 100, 1) == pytest.approx(t.decode_time(r, 100))
    with pytest.raises(ValueError):
        decode_seconds(t, r, 64, 0)


def test_a_version_1_table_still_reads_as_batch_1(tmp_path):
    import glob

    from profiler.costtable import batch_grid, decode_seconds, tp_block_seconds

    d = make_table().to_dict()
    d["version"] = 1
    del d["grids"]["decode_batch"]
    for r in d["rows"]:
        del r["decode_batch_s"], r["decode_batch_spread"]
    p = tmp_path / "v1.json"
    p.write_text(json.dumps(d))
    t = read_table(p)
    r = t.row("layers.0")
    assert batch_grid(t) == [1] and decode_seconds(t, r, 64) == r.decode_s[0]
    # no batch measured: B streams cost B single steps (no batching gain claimed)
    assert decode_seconds(t, r, 256, 4) == pytest.approx(4 * r.decode_s[1])
    with pytest.raises(CostTableError, match=r"v1\.json.*--tp-shares"):
        tp_block_seconds(t, 0, 2, "decode", 64)
    # rewritten, it is a version-2 table with the batch-1 grid
    again = json.loads(write_table(t, tmp_path / "v2.json").read_text())
    assert again["version"] == 2 and again["grids"]["decode_batch"] == [1]
    assert again["rows"][1]["decode_batch_s"] == [[v] for v in r.decode_s]
    # real version-1 tables written by the profiler of that version (the testbed benchmark's
    # profiles of 2026-12-02, kept here because the benchmark's own files are rewritten by
    # every rerun) read
    from pathlib import Path

    found = glob.glob(str(Path(__file__).parent / "data" / "v1-tables" / "*.json"))
    assert found
    for f in found:
        assert batch_grid(read_table(f)) == [1]


def test_tp_accessors_measured_and_derived_shares(tmp_path):
    from profiler.costtable import tp_block_bytes, tp_block_seconds

    t = _v2_table(tmp_path)
    assert tp_block_seconds(t, 1, 2, "decode", 64) == (0.1, False)
    assert tp_block_seconds(t, 2, 8, "prefill", 64) == (12.0, False)
    s, derived = tp_block_seconds(t, 0, 5, "decode", 256)  # halfway from 2 to 8 heads
    assert derived and s == pytest.approx((0.2 + 0.6) / 2)
    s, derived = tp_block_seconds(t, 0, 2, "prefill", 40)  # between prompt lengths
    assert derived and s == pytest.approx(2.5)
    s, derived = tp_block_seconds(t, 0, 1, "decode", 64)  # below the grid: never below k/2
    assert derived and 0.05 <= s <= 0.1
    assert tp_block_bytes(t, 0, 2) == (210, 128) and tp_block_bytes(t, 0, 5) == (510, 320)
    with pytest.raises(ValueError, match="from 1 to 8"):
        tp_block_seconds(t, 0, 9, "decode", 64)
    with pytest.raises(ValueError, match="phase"):
        tp_block_seconds(t, 0, 2, "train", 64)
    t.tensor_parallel["rows"] = []
    with pytest.raises(CostTableError, match="no row for layer 0"):
        tp_block_bytes(t, 0, 2)
