"""A workload outside the measured grids is named as extrapolated, in text and in the plan."""

import json
import subprocess
import sys

from graphsplit.cluster import cluster_from_tables
from graphsplit.costmodel import Workload, extrapolation_notes
from costtables import make_table


def test_notes_name_each_node_and_grid_outside_the_measurements():
    tables = {"b": make_table("b", decode_context=(128, 1024), prefill_tokens=(16, 64, 256)),
              "a": make_table("a", decode_context=(128, 4096), prefill_tokens=(16, 1024))}
    cluster = cluster_from_tables(tables)
    assert extrapolation_notes(cluster, Workload(prompt_tokens=64, context_tokens=512)) == []
    notes = extrapolation_notes(cluster, Workload(prompt_tokens=512, context_tokens=2048))
    assert len(notes) == 2
    assert notes[0].startswith("b: prompt 512") and "16..256" in notes[0]
    assert notes[1].startswith("b: context 2048") and "128..1024" in notes[1]


def test_split_model_reports_extrapolation(tmp_path):
    from profiler.costtable import write_table
    write_table(make_table("a", decode_context=(128, 256)), tmp_path / "a.json")
    (tmp_path / "c.json").write_text(json.dumps(
        {"model": "toy", "nodes": [{"id": "a", "profile": "a.json"}]}))
    base = [sys.executable, "-m", "graphsplit.cli", str(tmp_path / "c.json")]
    text = subprocess.run(base + ["--context-tokens", "1024"], capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert "note: a: context 1024 tokens is outside the measured grid 128..256" in text.stdout
    js = subprocess.run(base + ["--context-tokens", "200", "--prompt-tokens", "64", "--json"], capture_output=True,
                        text=True)
    assert json.loads(js.stdout)["predicted"]["extrapolated"] == []
