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


def _mutations():
    def version(d):
        d["version"] = 2

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

    return [("version", version, "version 2 is not supported"),
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
