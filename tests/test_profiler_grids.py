"""Batch and chunk grids, tensor-parallel shares: the slicing, the profiler's grids, the format."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from profiler import build, tpslice
from profiler.tiny import tiny_config


def _block(cfg, quant=None, seed=3):
    """Layer 0 of a model built from `cfg` with mlx-lm's own classes, random weights."""
    model_cls, _, _ = build.arch_classes(cfg)
    args = build.model_args(cfg)
    model = model_cls(args)
    block = model.layers[0]
    build.random_weights(block, mx.float32, seed)
    for lin in (block.self_attn, block.mlp):  # non-zero biases, so their placement is tested
        for k, m in lin.children().items():
            if isinstance(m, nn.Linear) and "bias" in m:
                m.bias = mx.random.normal(m.bias.shape, key=mx.random.key(seed + 7)) * 0.1
    if quant:
        build.quantize_module(block, quant["bits"], quant["group_size"])
    mx.eval(block.parameters())
    return block, args


def _tp_forward(parts, block, x, mask):
    """The block's output from its ranks, the all-reduces done by hand: a sum of partials."""
    n1 = block.input_layernorm(x)
    h = x + sum(p.self_attn(n1, mask, None) for p in parts)
    n2 = block.post_attention_layernorm(h)
    return h + sum(p.mlp(n2) for p in parts)


CASES = [
    # (config overrides, quantization, KV-head shares)
    (dict(model_type="llama"), None, [1, 3]),
    (dict(model_type="llama"), None, [2, 1, 1]),
    (dict(model_type="llama"), {"bits": 4, "group_size": 64}, [3, 1]),
    (dict(model_type="qwen2"), None, [1, 2, 1]),  # q/k/v biases, head_dim from hidden / heads
]


@pytest.mark.parametrize("over,quant,kv_shares", CASES)
def test_ranks_of_a_sliced_block_sum_to_the_whole_block(over, quant, kv_shares):
    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4, **over)
    if over["model_type"] == "llama":
        cfg.update(attention_bias=True, mlp_bias=True)  # o_proj / down_proj biases too
    block, args = _block(cfg, quant)
    gs = quant["group_size"] if quant else None
    ranges = tpslice.shares(4, 512, kv_shares, gs)
    parts = [tpslice.slice_block(block, args, kv, cols) for kv, cols in ranges]
    x = mx.random.normal((2, 5, 256), key=mx.random.key(1))
    mask = "causal"
    want = block(x, mask, None)
    got = _tp_forward(parts, block, x, mask)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
    for p, ((a, b), (c, d)) in zip(parts, ranges):
        assert type(p) is type(block) and type(p.self_attn) is type(block.self_attn)
        assert p.self_attn.n_kv_heads == b - a and p.self_attn.n_heads == 2 * (b - a)
        assert p.mlp.gate_proj.weight.shape[0] == d - c
    # the original block is untouched (still the whole block)
    assert block.self_attn.n_heads == 8 and mx.allclose(block(x, mask, None), want).item()


def test_sliced_block_decodes_with_its_own_share_of_the_kv_cache():
    """One rank with a KV cache: its cache holds its KV heads only, and a decode step of the
    ranks (prefill then one token, sums by hand) equals the whole block's."""
    from mlx_lm.models.cache import KVCache

    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4)
    block, args = _block(cfg)
    parts = [tpslice.slice_block(block, args, kv, c) for kv, c in tpslice.shares(4, 512, [1, 3])]
    x = mx.random.normal((1, 6, 256), key=mx.random.key(2))
    full_c, part_c = KVCache(), [KVCache() for _ in parts]

    def run(x, mask):
        n1 = block.input_layernorm(x)
        h = x + sum(p.self_attn(n1, mask, c) for p, c in zip(parts, part_c))
        return h + sum(p.mlp(block.post_attention_layernorm(h)) for p in parts)

    block(x[:, :5], "causal", full_c)
    run(x[:, :5], "causal")
    want = block(x[:, 5:], None, full_c)
    got = run(x[:, 5:], None)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
    assert [c.keys.shape[1] for c in part_c] == [1, 3] and full_c.keys.shape[1] == 4


def test_reduce_hook_reduces_the_partial_sums_then_every_rank_adds_the_bias():
    """Without `reduce` the bias of o_proj / down_proj sits on the rank whose columns start at
    0 (the partials sum to the whole); with `reduce` every rank reduces its partial sum, then
    adds the bias (as mlx's ShardedToAllLinear does around all_sum)."""
    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4)
    cfg.update(attention_bias=True, mlp_bias=True)
    block, args = _block(cfg)
    ranges = tpslice.shares(4, 512, [2, 2])
    z = mx.random.normal((1, 3, 512), key=mx.random.key(5))
    bias = block.mlp.down_proj.bias
    plain = [tpslice.slice_block(block, args, kv, c) for kv, c in ranges]
    doubled = [tpslice.slice_block(block, args, kv, c, reduce=lambda y: 2 * y)
               for kv, c in ranges]
    outs = []
    for r, (p, q, (_, (c, d))) in enumerate(zip(plain, doubled, ranges)):
        y = p.mlp.down_proj(z[..., c:d])
        partial = y - bias if r == 0 else y
        assert mx.allclose(q.mlp.down_proj(z[..., c:d]), 2 * partial + bias, atol=1e-4).item()
        outs.append(y)
    assert mx.allclose(outs[0] + outs[1], block.mlp.down_proj(z), atol=1e-4).item()


_RANK = """
import sys
import mlx.core as mx
import numpy as np
sys.path.insert(0, sys.argv[1])
from tests.test_profiler_grids import _block, _tp_cfg
from profiler import tpslice
from mlx_lm.models.cache import KVCache

g = mx.distributed.init(backend="ring", strict=True)
shares = [int(v) for v in sys.argv[3].split(",")]
cfg, quant = _tp_cfg()
block, args = _block(cfg, quant)
kv, cols = tpslice.shares(4, 512, shares, 64)[g.rank()]
part = tpslice.slice_block(block, args, kv, cols,
                           reduce=lambda y: mx.distributed.all_sum(y, group=g))
x = mx.random.normal((1, 6, 256), key=mx.random.key(2))
cache = KVCache()
part(x[:, :5], "causal", cache)
y = part(x[:, 5:], None, cache)
mx.eval(y)
np.save(sys.argv[2] + f"/rank{g.rank()}.npy", np.array(y))
"""


def _tp_cfg():
    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4)
    cfg.update(attention_bias=True, mlp_bias=True)
    return cfg, {"bits": 4, "group_size": 64}


def test_ranks_with_all_sum_over_a_real_ring_compute_the_whole_block(tmp_path):
    """Two processes over mx.distributed's ring backend on loopback, shares 3 + 1 KV heads of
    a 4-bit block with biases, the all-reduces done by `reduce=all_sum`: a prefill then one
    decode step with each rank's own KV cache gives the whole block's output on both ranks."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from mlx_lm.models.cache import KVCache

    from exo_bridge.runner.run import free_ports

    root = str(Path(__file__).resolve().parent.parent)
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
    procs = [subprocess.Popen([sys.executable, str(script), root, str(tmp_path), "3,1"],
                              env=dict(os.environ, MLX_HOSTFILE=str(hostfile), MLX_RANK=str(r),
                                       PYTHONPATH=root), cwd=root, stderr=subprocess.PIPE)
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=240)[1].decode()[-800:] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    cfg, quant = _tp_cfg()
    block, _ = _block(cfg, quant)
    x = mx.random.normal((1, 6, 256), key=mx.random.key(2))
    cache = KVCache()
    block(x[:, :5], "causal", cache)
    want = np.array(block(x[:, 5:], None, cache))
    for r in range(2):
        got = np.load(tmp_path / f"rank{r}.npy")
        assert np.allclose(got, want, atol=1e-4, rtol=1e-4), (r, np.abs(got - want).max())


@pytest.mark.parametrize("kv,cols,says", [
    ((0, 5), (0, 512), "kv_heads_range"), ((2, 2), (0, 512), "kv_heads_range"),
    ((0, 1), (0, 600), "mlp_cols_range"),
])
def test_slice_ranges_outside_the_block_are_refused(kv, cols, says):
    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4)
    block, args = _block(cfg)
    with pytest.raises(ValueError, match=says):
        tpslice.slice_block(block, args, kv, cols)


def test_quantized_columns_must_sit_on_group_boundaries():
    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4)
    block, args = _block(cfg, {"bits": 4, "group_size": 64})
    with pytest.raises(ValueError, match="group size 64"):
        tpslice.slice_block(block, args, (0, 1), (0, 100))
    assert tpslice.shares(4, 512, [1, 3], 64) == [((0, 1), (0, 128)), ((1, 4), (128, 512))]
    assert tpslice.mlp_columns(14336, 1, 8) == 1792 and tpslice.mlp_columns(100, 1, 3, 64) == 64


# ------------------------------------------------------------------ the profiler's grids, for real

def _tiny_tp_config(tmp_path, n_layers=3):
    import json

    cfg = tiny_config(n_layers=n_layers, hidden=256, intermediate=512, heads=8, kv_heads=4)
    p = tmp_path / "tp-config.json"
    p.write_text(json.dumps(cfg))
    return p


GRIDS = dict(prefill_tokens=[8, 32], decode_context=[16, 64], repeats=1, warmup=0,
             microbench=False, decode_batch=[1, 2, 4], prefill_chunk=[8], chain_blocks=2,
             tp_shares=[1, 2])


def test_profile_writes_the_batch_chunk_and_tp_grids(tmp_path):
    from profiler.costtable import (decode_seconds, read_table, tp_block_bytes,
                                    tp_block_seconds)
    from profiler.models import resolve_model
    from profiler.profile import ProfileOptions, profile_model

    spec = resolve_model(str(_tiny_tp_config(tmp_path)))
    out = tmp_path / "t.json"
    profile_model(spec, ProfileOptions(**GRIDS), out)
    t = read_table(out)
    assert t.decode_batch == [1, 2, 4] and t.prefill_chunk == [8]
    assert t.prefill_chunk_context == 64  # the largest decode context
    for r in t.rows:
        assert [len(c) for c in r.decode_batch_s] == [3, 3]
        assert [c[0] for c in r.decode_batch_s] == r.decode_s  # the batch-1 column
        assert all(v > 0 for c in r.decode_batch_s for v in c)
        assert len(r.prefill_chunk_s) == 1 and r.prefill_chunk_s[0] > 0
        for j, ctx in enumerate(t.decode_context):
            for b, batch in enumerate(t.decode_batch):
                assert decode_seconds(t, r, ctx, batch) == r.decode_batch_s[j][b]
        assert decode_seconds(t, r, 16, 1) == t.decode_time(r, 16)
    chains = t.method["decode_batch_chain_blocks"]
    assert list(chains) == ["layers.0"] and len(chains["layers.0"]) == 3
    tp = t.tensor_parallel
    assert tp["grid_kv_heads"] == [1, 2, 4] and tp["n_kv_heads"] == 4 and tp["q_per_kv"] == 2
    assert tp["allreduce_bytes_per_token"] == 256 * 4 and tp["allreduces_per_block"] == 2
    assert sorted(r["kv_heads"] for r in tp["rows"]) == [1, 2, 4]
    block = t.row("layers.0")
    for r in tp["rows"]:
        k = r["kv_heads"]
        assert r["layers"] == [0, 1, 2] and r["measured_from"] == "layers.0"
        assert r["mlp_columns"] == 512 * k // 4
        # KV bytes are exactly the share's heads; weights the share's slices + both norms
        assert r["kv_bytes_per_token"] == block.kv_bytes_per_token * k // 4
        assert (r["weight_bytes"] < block.weight_bytes) == (k < 4)
        assert tp_block_seconds(t, 2, k, "decode", 16) == (r["decode_s"][0], False)
        assert tp_block_seconds(t, 1, k, "prefill", 32) == (r["prefill_s"][1], False)
        assert tp_block_bytes(t, 0, k) == (r["weight_bytes"], r["kv_bytes_per_token"])
    whole = next(r for r in tp["rows"] if r["kv_heads"] == 4)
    assert whole["decode_s"] == block.decode_s and whole["prefill_s"] == block.prefill_s
    two, four = (next(r for r in tp["rows"] if r["kv_heads"] == k) for k in (2, 4))
    s3, derived = tp_block_seconds(t, 0, 3, "decode", 64)
    assert derived and s3 == pytest.approx((two["decode_s"][1] + four["decode_s"][1]) / 2)
    assert tp_block_bytes(t, 0, 3)[1] == block.kv_bytes_per_token * 3 // 4
    assert tp_block_seconds(t, 0, 2, "decode", 40)[1]  # between contexts: derived


def test_an_interrupted_run_resumes_with_its_grids(tmp_path):
    """The resume file (complete=false) holds the batch grid and the tensor-parallel rows of
    the blocks done; the rerun measures only the rest and completes both."""
    import json

    from profiler.costtable import read_table
    from profiler.models import resolve_model
    from profiler.profile import ProfileOptions, profile_model

    spec = resolve_model(str(_tiny_tp_config(tmp_path, n_layers=2)))
    out = tmp_path / "r.json"
    opts = dict(GRIDS, every_layer=True, chain_blocks=1)

    def stop_after_layer0(e):
        if e.get("event") == "row_done" and e["name"] == "layers.0":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_model(spec, ProfileOptions(**opts), out, progress=stop_after_layer0)
    part = json.loads(out.read_text())
    assert part["complete"] is False and part["version"] == 2
    assert [r["name"] for r in part["rows"]] == ["embed", "layers.0"]
    assert {r["layers"][0] for r in part["tensor_parallel"]["rows"]} == {0}
    before = part["tensor_parallel"]["rows"]
    events = []
    profile_model(spec, ProfileOptions(**opts), out, progress=events.append)
    done = [e["name"] for e in events if e["event"] == "row_done"]
    assert done == ["layers.1", "head"]
    assert any("resuming" in e.get("text", "") for e in events)
    t = read_table(out)
    rows = t.tensor_parallel["rows"]
    assert rows[:len(before)] == before  # layer 0's rows kept as they were
    assert sorted((r["layers"][0], r["kv_heads"]) for r in rows) == \
        [(0, 1), (0, 2), (0, 4), (1, 1), (1, 2), (1, 4)]
    # another batch grid is another run: refused in one line, not mixed in
    from profiler.errors import UserError

    with pytest.raises(UserError, match="decode_batch"):
        profile_model(spec, ProfileOptions(**dict(opts, decode_batch=[1, 8])), out)


def test_tp_shares_that_cannot_be_cut_are_refused_naming_the_flag(tmp_path, capsys):
    from profiler import cli

    cfg = _tiny_tp_config(tmp_path)
    for shares, says in (("5", "cannot be cut from"), ("0", "out of range"),
                         ("1.5", "not a whole number")):
        rc = cli.main([str(cfg), "--tp-shares", shares, "--out", str(tmp_path / "x.json")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "--tp-shares" in err and says in err, err
    # quantized: one KV head of the 64-wide tiny model cuts o_proj inside a 64-group
    small = tmp_path / "small.json"
    import json

    small.write_text(json.dumps(tiny_config(n_layers=2)))
    rc = cli.main([str(small), "--tp-shares", "1", "--out", str(tmp_path / "y.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "--tp-shares" in err and "quantization group 64" in err, err
    rc = cli.main([str(small), "--batch", "2", "--decode-batch", "1,4",
                   "--out", str(tmp_path / "z.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "--batch 2" in err and "--decode-batch" in err, err
    assert not list(tmp_path.glob("[xyz].json"))


def test_batch_chain_shortens_only_where_a_pass_already_lasts_long():
    from profiler.rows import batch_chain_length

    # CPU-like: 0.156 s per block step at batch 1 (one Llama-3-8B 4-bit block, measured)
    assert [batch_chain_length(8, b, 0.156, 1.0) for b in (2, 4, 8, 16)] == [4, 2, 1, 1]
    # GPU-like: 1 ms per block step: the whole chain at every batch
    assert [batch_chain_length(8, b, 0.001, 1.0) for b in (2, 16, 64)] == [8, 8, 8]
    assert batch_chain_length(8, 16, 0.156, 0.0) == 8  # 0: always the whole chain
    assert batch_chain_length(3, 2, 0.0, 1.0) == 3  # no batch-1 time: the whole chain
