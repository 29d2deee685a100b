"""What-if machines and the `what-if` command (issue 13, items 3 and 4).

Chip nodes are the roofline of the chip itself (graphsplit.roofline) at efficiencies measured
on real Apple machines; they are checked here against the published mlx-lm figures they come
from (roofline.ANCHORS) with the real byte counts of the models (tests/shapes.py builds them
with MLX, lazily). The `what-if` command is run in-process on real cluster files, and each of
its variants is checked against what `split-model` plans for the same cluster written out.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from costtables import GiB, MiB, make_table, write_cluster
from graphsplit import chips, roofline
from graphsplit.cluster import ClusterError, load_cluster
from shapes import shaped_table


def within(x: float, lo: float, hi: float, tol: float = 0.20) -> bool:
    """x is within `tol` of the published range lo..hi."""
    return lo * (1 - tol) <= x <= hi * (1 + tol)


def derived(table, chip: str, host: str = "chip"):
    s = chips.lookup(chip)
    from graphsplit.cluster import derive_table
    return derive_table(table, s.bandwidth_gbs, s.fp16_tflops, s.memory_bytes, host=host,
                        chip_name=s.name, generation=s.chip.generation)


# -- the chip table -----------------------------------------------------------------------------

@pytest.mark.parametrize("chip, tflops", [
    ("M1 8c 16GB", 2.6), ("M1 Pro 16c 32GB", 5.2), ("M1 Max 32c 64GB", 10.4),
    ("M1 Ultra 64c 128GB", 21.0), ("M2 10c 24GB", 3.6), ("M2 Pro 19c 32GB", 6.8),
    ("M2 Max 38c 96GB", 13.6), ("M2 Ultra 76c 192GB", 27.2)])
def test_tflops_formula_reproduces_apples_published_figures(chip, tflops):
    assert chips.lookup(chip).fp16_tflops == pytest.approx(tflops, rel=0.01)


@pytest.mark.parametrize("text, family, cores, gbs, mem", [
    ("M4 Pro 48GB", "M4 Pro", 20, 273, 48), ("m4-pro-48gb", "M4 Pro", 20, 273, 48),
    ("Apple M4 Max (40-core GPU) 128 GB", "M4 Max", 40, 546, 128),
    ("M4 Max 36GB", "M4 Max", 32, 410, 36), ("m2_ultra_192gb", "M2 Ultra", 76, 800, 192),
    ("M3 Ultra 512GB", "M3 Ultra", 80, 819, 512), ("M1 Max 24c 32GB", "M1 Max", 24, 400, 32)])
def test_chip_names(text, family, cores, gbs, mem):
    s = chips.lookup(text)
    assert (s.chip.family, s.chip.gpu_cores, s.bandwidth_gbs, s.memory_gb) == \
        (family, cores, gbs, mem)
    assert s.memory_bytes == mem * GiB


@pytest.mark.parametrize("text, says", [
    ("M5 Max 128GB", "close matches: M4 Max 128GB"), ("m4pro 32gb", "not 32"),
    ("M4 Pro", "give its memory, e.g. 'M4 Pro 64GB'"), ("M4 Max 30c 64GB", "32 or 40-core"),
    ("studio", "unknown chip 'studio'")])
def test_bad_chip_names_say_what_exists(text, says):
    with pytest.raises(chips.ChipError) as e:
        chips.lookup(text)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_usable_memory_is_metals_default_working_set():
    assert chips.usable_bytes(16 * GiB) == pytest.approx(10.67 * GiB, rel=0.01)  # exo#1672
    assert chips.usable_bytes(128 * GiB) == pytest.approx(107.52 * GiB, rel=0.001)  # ds4#893


# -- the roofline against published figures -----------------------------------------------------

def test_gemv_efficiency_reproduces_316_of_410_gbs():
    """The LM head of Llama-3-8B 4-bit is one quantized GEMV (128256 x 4096): on the M1 Max's
    409.6 GB/s physical peak it streams at 316 GB/s; on Apple's rounded 400 GB/s, 2.4% less."""
    t = shaped_table("llama-3-8b")
    head = t.head.weight_bytes
    for gbs, want in ((409.6, 316 * 409.6 / 410), (chips.lookup("M1 Max 64GB").bandwidth_gbs,
                                                   316 * 400 / 410)):
        d = roofline.derive(t, gbs, 10.4, 64 * GiB, 40 * GiB, "m1max", "M1 Max")
        derived_gbs = head / d.head.decode_s[0] / 1e9
        assert derived_gbs == pytest.approx(want, rel=1e-6)
    assert derived_gbs == pytest.approx(316, rel=0.03)


def test_gemv_efficiency_of_m3_and_later_reproduces_the_m3_max_measurement():
    """mlx#3852: a 4-bit 5120 -> 17408 GEMV with fresh weights each repeat took 0.126 ms on
    an M3 Max; its bytes as MLX stores them (weights, bfloat16 scales and biases), over the
    derived M3 Max's weight-streaming rate, give that time."""
    import mlx.core as mx
    import mlx.nn as nn

    from profiler.build import cast_floating, param_bytes

    q = nn.Linear(5120, 17408, bias=False).to_quantized(group_size=64, bits=4)  # lazy
    cast_floating(q, mx.bfloat16)
    nbytes = param_bytes(q)
    m3 = chips.lookup("M3 Max 64GB")
    peak = roofline.Peak(m3.bandwidth_gbs, m3.fp16_tflops,
                         roofline.gemv_efficiency(m3.chip.generation))
    assert peak.seconds(nbytes, 2 * 5120 * 17408) == pytest.approx(0.126e-3, rel=0.01)
    assert roofline.gemv_efficiency(None) == roofline.GEMV_BW_EFFICIENCY  # numbers: lower


def _anchor_tok_s(a: roofline.Anchor) -> float:
    return roofline.tokens_per_s(derived(shaped_table(a.model), a.chip), a.phase, a.tokens)


@pytest.mark.parametrize("anchor", roofline.ANCHORS, ids=lambda a: f"{a.model}-{a.chip}-"
                         f"{a.phase}-{a.tokens}")
def test_derived_chip_matches_published_mlx_lm_figures(anchor):
    got = _anchor_tok_s(anchor)
    assert within(got, anchor.tok_s, anchor.tok_s), (got, anchor)


def test_m3_ultra_llama_3_1_8b_decodes_at_110_to_120_tokens_per_s():
    """Through the splitter: a plan on the derived M3 Ultra alone (a slow measured node that
    only supplies the model's shape), predicted tokens/s within 20% of 110-120."""
    from graphsplit.api import make_plan
    from graphsplit.cluster import chip_node, cluster_from_tables
    from graphsplit.costmodel import Workload

    slow = shaped_table("llama-3-8b", dtype="float32", host="linux", speed=0.01)
    c = cluster_from_tables({"linux": slow})
    c.nodes.append(chip_node("ultra", "M3 Ultra 256GB", c.nodes[0]))
    plan = make_plan(c, "latency", Workload(prompt_tokens=128, context_tokens=512),
                     "mlx-pipeline")
    assert [s.node for s in plan.stages] == ["ultra"]
    tok_s = 1 / plan.predicted["tpot_s"]
    assert within(tok_s, 110, 120), tok_s
    assert plan.predicted["estimated"] is True and plan.nodes["ultra"]["estimated"] is True


def test_fitted_constants_follow_from_their_anchors():
    """BLOCK_OVERHEAD_S and COMPUTE_EFFICIENCY are what their anchors say (the docstring's
    claim), and without the overhead the 8B decode would miss by more than 20%."""
    fits = {a.use: a for a in roofline.ANCHORS}
    a = fits["fits BLOCK_OVERHEAD_S"]
    t = derived(shaped_table(a.model), a.chip)
    n = t.n_layers
    bare = 1 / roofline.tokens_per_s(t, "decode", a.tokens) - n * roofline.BLOCK_OVERHEAD_S
    assert (1 / a.tok_s - bare) / n == pytest.approx(roofline.BLOCK_OVERHEAD_S, rel=0.02)
    assert not within(1 / bare, 110, 120)  # the plain bandwidth roofline: ~188 tokens/s
    a = fits["fits COMPUTE_EFFICIENCY"]
    got = _anchor_tok_s(a)
    assert got == pytest.approx(a.tok_s, rel=0.01)


def test_the_estimate_does_not_depend_on_which_table_it_came_from():
    """Two tables of the same model, measured 100x apart in speed, one on the Linux CPU build
    (float32 scales and activations), one as on Metal (bfloat16): the same chip times. The old
    bandwidth-ratio scaling gave times 100x apart."""
    a = derived(shaped_table("llama-3-8b", dtype="float32", host="linux", speed=0.01), "M4 Pro 48GB")
    b = derived(shaped_table("llama-3-8b", dtype="bfloat16", host="mac", speed=1.0), "M4 Pro 48GB")
    assert a.prefill_tokens == b.prefill_tokens and a.decode_context == b.decode_context
    for ra, rb in zip(a.rows, b.rows):
        assert ra.decode_s == pytest.approx(rb.decode_s, rel=1e-3), ra.name
        assert ra.prefill_s == pytest.approx(rb.prefill_s, rel=1e-3), ra.name
        assert ra.weight_bytes == pytest.approx(rb.weight_bytes, rel=1e-3), ra.name
        assert ra.kv_bytes_per_token == rb.kv_bytes_per_token
    assert a.dtype == b.dtype == "bfloat16"
    assert "estimated" in a.method and a.device.platform == "estimated"


# -- cluster files --------------------------------------------------------------------------------

def test_cluster_file_chip_by_name(tmp_path):
    t = {"box": make_table("box", 8, memory_usable=8 * GiB)}
    p = write_cluster(tmp_path, t, extra_nodes=[{"id": "mini", "chip": "m4-pro-48gb"},
                                                {"id": "old", "derive_from": "box",
                                                 "chip": {"memory_bandwidth_gbs": 100,
                                                          "fp16_tflops": 3.6,
                                                          "memory_bytes": 16 * GiB}}])
    c = load_cluster(p)
    mini, old = c.node("mini"), c.node("old")
    assert mini.estimated and mini.derive_from == "box" and old.estimated
    assert mini.table.device.memory_bandwidth_gbs == 273 and mini.total_bytes == 48 * GiB
    assert mini.memory_bytes == chips.usable_bytes(48 * GiB)
    assert "M4 Pro" in mini.table.device.name and "estimated" in mini.table.device.name
    # the same bytes, 273 vs 100 GB/s, and an M4 streams at the M3-and-later efficiency where
    # a chip given as numbers gets the M1 figure: the M4 Pro decodes a block that much faster
    r = "layers.0"
    oh = roofline.BLOCK_OVERHEAD_S
    assert (old.table.row(r).decode_s[0] - oh) / (mini.table.row(r).decode_s[0] - oh) == \
        pytest.approx(2.73 * roofline.GEMV_BW_EFFICIENCY_M3 / roofline.GEMV_BW_EFFICIENCY)


@pytest.mark.parametrize("chip, says", [
    ("M5 Ultra 512GB", "nodes[1].chip"), ("M4 Pro 32GB", "not 32"),
    (17, "a chip name such as"), ({"memory_bandwidth_gbs": 100}, "fp16_tflops")])
def test_bad_chip_in_a_cluster_file_is_one_line_exit_2(tmp_path, capsys, chip, says):
    from graphsplit.cli import main as split_main

    p = write_cluster(tmp_path, {"box": make_table("box", 4)},
                      extra_nodes=[{"id": "new", "chip": chip}])
    rc = split_main([str(p)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(p) in err and (says in err or "close matches" in err), err


# -- the what-if command --------------------------------------------------------------------------

@pytest.fixture
def cluster(tmp_path):
    """Two measured nodes of a 16-layer model on a slow default link (4 ms, 1 Gbit/s)."""
    t = {"a": make_table("a", 16, decode_s=0.004, memory_usable=1700 * MiB, weight_bytes=150 * MiB),
         "b": make_table("b", 16, decode_s=0.006, memory_usable=1700 * MiB, weight_bytes=150 * MiB)}
    return write_cluster(tmp_path, t, default_link={"latency_ms": 4.0, "bandwidth_gbps": 1.0})


def run_whatif(argv, capsys) -> tuple[int, str, str]:
    from graphsplit.whatif import main
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_whatif_json_every_variant_is_what_split_model_plans(cluster, tmp_path, capsys):
    rc, out, err = run_whatif([cluster, "--add", "M4 Pro 24GB", "--add", "x=M1 8c 8GB",
                               "--link", "a:b=tb5", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    names = [v["name"] for v in d["variants"]]
    assert names[0] == "baseline" and names[-1] == "all of the above" and len(names) == 5
    base = d["variants"][0]
    for v in d["variants"]:
        assert v["error"] is None and v["stages"], v
        assert v["gain"] == pytest.approx(base["predicted"]["tpot_s"] / v["predicted"]["tpot_s"])
        # the same cluster written out as a file: split-model's plan is the variant's
        spec = json.loads(cluster.read_text())
        for ch in v["changes"]:
            if ch["kind"] == "add":
                spec["nodes"].append({"id": ch["node"], "chip": ch["chip"]})
            spec["links"] = spec.get("links", []) + ch["links"]
        f = cluster.parent / f"v{names.index(v['name'])}.json"
        f.write_text(json.dumps(spec))
        from graphsplit.cli import main as split_main
        assert split_main([str(f), "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["stages"] == v["stages"], v["name"]
        assert plan["predicted"]["tpot_s"] == pytest.approx(v["predicted"]["tpot_s"])
    # a Thunderbolt cable between two nodes that both hold layers: 4 ms -> 0.15 ms per hop
    link = d["variants"][3]
    assert link["name"] == "link a:b=tb5" and link["gain"] > 1.0
    assert set(d["variants"][1]["estimated"]) == {"m4-pro-24gb"}


def test_whatif_table_answers_the_questions(cluster, capsys):
    rc, out, err = run_whatif([cluster, "--add", "M4 Pro 24GB", "--add", "M1 8c 8GB",
                               "--link", "a:b=1ms,10Gbit/s", "--objective", "throughput", "--context-tokens", "256",
                               "--streams", "4"], capsys)
    assert rc == 0, err
    for want in ("baseline", "m4-pro-24gb*", "+ m1-8gb (M1 8GB*)", "all of the above",
                 "best single addition: + m4-pro-24gb", "link a:b=1ms,10Gbit/s:",
                 "derived from the measured cost tables"):
        assert want in out, (want, out)


def test_whatif_when_the_model_only_fits_with_an_addition(tmp_path, capsys):
    t = {"a": make_table("a", 8, memory_usable=500 * MiB, weight_bytes=150 * MiB)}
    p = write_cluster(tmp_path, t)
    rc, out, err = run_whatif([p, "--add", "M4 Pro 24GB", "--json"], capsys)
    assert rc == 0, err
    base, add = json.loads(out)["variants"]
    assert base["error"] and "does not fit" in base["error"] and base["gain"] is None
    assert add["stages"] and add["gain"] is None
    rc, out, err = run_whatif([p, "--add", "M4 Pro 24GB"], capsys)
    assert rc == 0 and "the baseline has no plan; it fits with: + m4-pro-24gb" in out


@pytest.mark.parametrize("argv, says", [
    ([], "give at least one --add"),
    (["--add", "M9 48GB"], "argument --add: unknown chip"),
    (["--add", "a=M4 Pro 48GB"], "node 'a' is already in the cluster"),
    (["--link", "a:z=tb5"], "no node 'z'"),
    (["--link", "a:b=tb9"], "argument --link: 'tb9' is not a preset"),
    (["--link", "a:b=0.3ms,5GB"], "LATENCY,BANDWIDTH"),
    (["--link", "a:a=tb5"], "two different nodes"),
    (["--objective", "pareto"], "invalid choice"),
])
def test_whatif_bad_options_are_one_line_exit_2(cluster, capsys, argv, says):
    rc, out, err = run_whatif([cluster] + argv, capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert says in err and "Traceback" not in err, err


def test_whatif_console_entry_point(cluster):
    cp = subprocess.run([sys.executable, "-m", "graphsplit.whatif", str(cluster), "--add",
                         "M4 Pro 24GB", "--link", "a:b=tb4"], capture_output=True, text=True,
                        timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert "link a:b=tb4:" in cp.stdout and "m4-pro-24gb" in cp.stdout


def test_whatif_a_cable_between_two_added_machines_is_in_all_of_the_above(cluster, capsys):
    rc, out, err = run_whatif([cluster, "--add", "p=M4 Pro 24GB", "--add", "q=M4 Pro 24GB",
                               "--link", "p:q=tb5", "--link", "a:p=tb4", "--json"], capsys)
    assert rc == 0, err
    vs = {v["name"]: v for v in json.loads(out)["variants"]}
    assert list(vs) == ["baseline", "+ p (M4 Pro 24GB*) a:p=tb4", "+ q (M4 Pro 24GB*)",
                        "all of the above"]
    links = [(ln["from"], ln["to"]) for ch in vs["all of the above"]["changes"]
             for ln in ch["links"]]
    assert links == [("a", "p"), ("p", "q")]


def test_link_presets_and_explicit_links():
    from graphsplit.whatif import PRESETS, parse_link

    a, b, s = parse_link("studio:mini=TB5")
    assert (a, b, s) == ("studio", "mini", PRESETS["tb5"])
    assert PRESETS["tb5"].latency_ms == 0.15 and PRESETS["tb5"].bandwidth_gbps == 52
    _, _, s = parse_link("x:y=0.3ms,5GB/s")
    assert (s.latency_ms, s.bandwidth_gbps) == (0.3, 40.0)  # gigabytes -> gigabits
    _, _, s = parse_link("x:y=50us,40Gbit/s")
    assert (s.latency_ms, s.bandwidth_gbps) == pytest.approx((0.05, 40.0))
    _, _, s = parse_link("x:y=2ms,300Mbps")
    assert s.bandwidth_gbps == pytest.approx(0.3)


def test_cluster_without_a_measured_node_for_the_chip(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"nodes": [{"id": "a", "chip": "M4 Pro 48GB"}]}))
    with pytest.raises(ClusterError, match="needs a node with a measured profile"):
        load_cluster(p)
