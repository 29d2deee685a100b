"""Timing one row of the cost table: the embedding, one transformer block, or norm + LM head.

What each time means (all measured, medians of the repeats):

* block prefill at P: the block processes a (B, P, hidden) hidden state (normal noise of the
  activation dtype) with a causal mask into an EMPTY KV cache, outputs and cache evaluated;
* block decode at C: the block's KV cache really holds C tokens (written directly with noise of
  the right shape and dtype, as a prefill would leave it), one new token is processed; the cache
  is rewound to C before every repeat;
* embed: token ids -> hidden states, for P tokens (prefill) and 1 token (decode; context does not
  change it, measured once and reported at every context);
* head: the final norm and the LM head on the LAST position only (what producing the next token
  needs), so its prefill time barely depends on P; decode likewise measured once.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace

import mlx.core as mx
from mlx.utils import tree_flatten

from profiler.measure import Timing, time_fn


@dataclass
class Method:
    """How to time: grids, repeats, and the spread rule."""

    prefill_tokens: list[int]
    decode_context: list[int]
    warmup: int = 1
    repeats: int = 3
    max_rel_spread: float = 0.15
    max_rounds: int = 2
    batch: int = 1
    seed: int = 0
    flush: bool = True  # evict caches before every timed run (see flush_caches)
    clock: str = "wall"  # wall | process (see measure.time_fn)
    settle_s: float = 0.0  # idle after the untimed setup, before the clock (see measure.time_fn)
    # block decode: a timed sample makes up to decode_max_steps steps back to back (cache
    # rewound between them, inside the clock) until it lasts decode_min_sample_s; see time_fn
    decode_min_sample_s: float = 0.0
    decode_max_steps: int = 1


def cache_arrays(cache) -> list:
    """Every array a cache holds (to evaluate what a step wrote)."""
    if cache is None:
        return []
    state = cache.state
    return [a for _, a in tree_flatten(state) if isinstance(a, mx.array)] if not isinstance(
        state, mx.array) else [state]


def hidden(batch: int, tokens: int, hidden_size: int, dtype, seed: int = 0) -> mx.array:
    x = mx.random.normal((batch, tokens, hidden_size), key=mx.random.key(seed)).astype(dtype)
    mx.eval(x)
    return x


def _mask(x, cache):
    from mlx_lm.models.base import create_attention_mask

    return create_attention_mask(x, cache)


def chain_pass(blocks: list, x: mx.array, caches: list) -> None:
    """One pass of `x` through `blocks` in order, block i with caches[i], one attention mask
    (from the first cache) and one mx.eval of the output and every cache: how a pipeline stage
    runs its blocks, and what every chain timing here and in the self-check runs."""
    h, mask = x, _mask(x, caches[0])
    for b, c in zip(blocks, caches):
        h = b(h, mask, c)
    mx.eval(h, *[a for c in caches for a in cache_arrays(c)])


def fill_cache(block, template_cache, context: int, x1: mx.array, seed: int = 1):
    """A cache for `block` holding `context` tokens. KV-style caches are written directly with
    normal noise of the shape and dtype the block's own keys/values have (found by running one
    token through a scratch cache); other caches are filled by a real prefill."""
    probe = copy.deepcopy(template_cache)
    out = block(x1, _mask(x1, probe), probe)
    mx.eval(out, *cache_arrays(probe))
    cache = copy.deepcopy(template_cache)
    if hasattr(cache, "update_and_fetch") and getattr(probe, "keys", None) is not None \
            and isinstance(probe.keys, mx.array):
        kshape = list(probe.keys.shape)
        vshape = list(probe.values.shape)
        kshape[2] = vshape[2] = context
        key = mx.random.key(seed)
        k1, k2 = mx.random.split(key)
        keys = mx.random.normal(kshape, key=k1).astype(probe.keys.dtype)
        values = mx.random.normal(vshape, key=k2).astype(probe.values.dtype)
        cache.update_and_fetch(keys, values)
    else:  # unknown cache kind: fill it the expensive, exact way
        xb = mx.random.normal((x1.shape[0], context, x1.shape[2])).astype(x1.dtype)
        cache_out = block(xb, _mask(xb, cache), cache)
        mx.eval(cache_out)
    mx.eval(*cache_arrays(cache))
    return cache


def rewind(cache, context: int) -> None:
    """Put a cache back to `context` tokens after a timed decode step."""
    if hasattr(cache, "offset") and cache.offset > context:
        if hasattr(cache, "trim") and cache.is_trimmable():
            cache.trim(cache.offset - context)
        else:
            cache.offset = context


_FLUSH: list = []


def flush_caches() -> None:
    """Evict the CPU / GPU caches (read a 64 MiB buffer, untimed) so that every timed run
    streams its weights from memory, as a layer does inside a whole model whose weights do
    not fit in cache - without this, small layers are timed with hot caches and the rows
    under-predict the whole model."""
    if not _FLUSH:
        _FLUSH.append(mx.random.uniform(shape=(16 * 2**20,)))
        mx.eval(_FLUSH[0])
    mx.eval(mx.sum(_FLUSH[0]))  # reads 64 MiB, allocates nothing


def _t(fn, m: Method, setup=None, between=None) -> Timing:
    def prepare():
        if setup is not None:
            setup()
        if m.flush:
            flush_caches()

    return time_fn(fn, warmup=m.warmup, repeats=m.repeats, max_rel_spread=m.max_rel_spread,
                   max_rounds=m.max_rounds, setup=prepare, clock=m.clock,
                   settle_s=m.settle_s,
                   min_sample_s=m.decode_min_sample_s if between is not None else 0.0,
                   max_inner=m.decode_max_steps if between is not None else 1,
                   between=between)


def time_block(block, template_cache, hidden_size: int, dtype, m: Method):
    """(prefill timings per P, decode timings per C) of one materialised block, alone."""
    return time_chain([block], [template_cache], hidden_size, dtype, m)


def peak_pass(block, template_cache, hidden_size: int, dtype, m: Method) -> None:
    """Run one block alone, untimed, at the largest prefill and decode points (what its peak
    memory is read from, before other blocks of a chain are made real)."""
    x = hidden(m.batch, max(m.prefill_tokens), hidden_size, dtype, seed=m.seed)
    cache = copy.deepcopy(template_cache)
    y = block(x, _mask(x, cache), cache)
    mx.eval(y, *cache_arrays(cache))
    del x, y, cache
    x1 = hidden(m.batch, 1, hidden_size, dtype, seed=m.seed + 101)
    cache = fill_cache(block, template_cache, max(m.decode_context), x1, seed=m.seed + 200)
    y = block(x1, _mask(x1, cache), cache)
    mx.eval(y, *cache_arrays(cache))


def _per_block(t: Timing, k: int) -> Timing:
    return Timing(t.median_s / k, t.spread, [v / k for v in t.samples], t.rounds, t.inner)


# A block's prefill is timed inside a chain of distinct blocks of its structure (as a stage
# runs them) when one block's prefill pass is short: as many blocks as one pass of this many
# seconds holds (at least 1, at most the chain). Short passes carry a per-pass cost that a
# stage amortises over its blocks (qwen2.5-0.5b, 4 tokens, no quota, 15 rounds: the chain of 8
# read 2.8 % below the block alone; bench/exp_chain_vs_alone.py). Long passes (seconds on this
# CPU build) are timed alone: their per-pass cost is lost in them, and k of them would
# multiply the profile's time.
PREFILL_CHAIN_PASS_S = 0.4


def prefill_lengths(blocks: list, template_caches: list, hidden_size: int, dtype, m: Method,
                    pass_s: float = PREFILL_CHAIN_PASS_S) -> list[int]:
    """Per prefill length P, how many of `blocks` its prefill is timed in (see
    PREFILL_CHAIN_PASS_S): floor(pass_s / one block's prefill at P), between 1 and
    len(blocks). One block's time comes from a second untimed pass after a warm-up one; P
    are tried shortest first, and once a warm-up pass alone exceeds pass_s that P and every
    longer one are timed alone. pass_s <= 0 or one block: 1 everywhere (timed alone)."""
    out = [1] * len(m.prefill_tokens)
    if pass_s <= 0 or len(blocks) == 1:
        return out
    for i in sorted(range(len(m.prefill_tokens)), key=lambda k: m.prefill_tokens[k]):
        x = hidden(m.batch, m.prefill_tokens[i], hidden_size, dtype, seed=m.seed + i)

        def run(x=x) -> float:
            cache = copy.deepcopy(template_caches[0])
            t0 = time.perf_counter()
            chain_pass(blocks[:1], x, [cache])
            return time.perf_counter() - t0

        if run() > pass_s:  # even cold: alone, and so is every longer prompt (seconds-long
            break           # passes on the CPU build cost one untimed pass, not two)
        out[i] = max(1, min(len(blocks), int(pass_s // max(run(), 1e-9))))
        del x
    return out


def time_chain(blocks: list, template_caches: list, hidden_size: int, dtype, m: Method,
               prefill_blocks: list[int] | None = None):
    """(prefill timings per P, decode timings per C) PER BLOCK of a chain of materialised
    blocks: the output of one is the input of the next and the chain is one graph with one
    mx.eval, as a pipeline stage and the whole model run their blocks; a timing is the chain's
    time / its length. Blocks of one structure with distinct weights give that structure's
    time per block as it runs inside a stage (docs/profiler.md, "Chain of distinct blocks").

    Decode runs the whole chain, one pass per timed sample (a chain of k > 1 blocks is never
    repeated back to back: a stage runs one pass after waiting for its input). Prefill at the
    j-th P runs the first prefill_blocks[j] blocks (prefill_lengths; default 1: each block
    alone)."""
    prefill = []
    for i, p in enumerate(m.prefill_tokens):
        n = max(1, prefill_blocks[i]) if prefill_blocks else 1
        pre_blocks, pre_caches = blocks[:n], template_caches[:n]
        x = hidden(m.batch, p, hidden_size, dtype, seed=m.seed + i)

        def run(x=x, pre_blocks=pre_blocks, pre_caches=pre_caches):
            chain_pass(pre_blocks, x, [copy.deepcopy(t) for t in pre_caches])

        prefill.append(_per_block(_t(run, m), len(pre_blocks)))
        del x
    return prefill, time_decode_chain(blocks, template_caches, hidden_size, dtype, m, m.batch)


def time_decode_chain(blocks: list, template_caches: list, hidden_size: int, dtype,
                      m: Method, batch: int) -> list[Timing]:
    """Decode timings per C, PER BLOCK, of the chain `blocks` (see `time_chain`) making one
    step of `batch` streams, each with a KV cache of C tokens."""
    k = len(blocks)
    md = m if k == 1 else replace(m, decode_max_steps=1)
    decode = []
    x1 = hidden(batch, 1, hidden_size, dtype, seed=m.seed + 101)
    for j, c in enumerate(m.decode_context):
        caches = [fill_cache(b, t, c, x1, seed=m.seed + 200 + j + 1000 * n)
                  for n, (b, t) in enumerate(zip(blocks, template_caches))]

        def step(caches=caches):
            chain_pass(blocks, x1, caches)

        def back(caches=caches, c=c):
            for cc in caches:
                rewind(cc, c)

        decode.append(_per_block(_t(step, md, setup=back, between=back), k))
        del caches
    return decode


def batch_chain_length(k: int, batch: int, step_s: float, min_pass_s: float) -> int:
    """Blocks in the decode chain at `batch` streams: all k, unless a pass of fewer already
    lasts `min_pass_s` (estimated as batch x the batch-1 step `step_s` per block, the cost of a
    compute-bound step; a memory-bound one costs less and keeps more blocks). Where a pass
    lasts that long the per-pass costs the chain averages out are a few percent of it."""
    if step_s <= 0 or min_pass_s <= 0:
        return k
    return max(1, min(k, math.ceil(min_pass_s / (batch * step_s))))


def time_chunks(block, template_cache, hidden_size: int, dtype, m: Method, chunks: list[int],
                context: int) -> list[Timing]:
    """Timings of `block` prefilling a chunk of c tokens (per `chunks`) with `context` tokens
    already in its KV cache (written directly, as `fill_cache`), causal within the chunk and
    attending to the whole cache; the cache is rewound to `context` before every run."""
    out = []
    x1 = hidden(m.batch, 1, hidden_size, dtype, seed=m.seed + 301)
    cache = fill_cache(block, template_cache, context, x1, seed=m.seed + 302) if context \
        else copy.deepcopy(template_cache)
    for i, c in enumerate(chunks):
        x = hidden(m.batch, c, hidden_size, dtype, seed=m.seed + 310 + i)

        def run(x=x):
            y = block(x, _mask(x, cache), cache)
            mx.eval(y, *cache_arrays(cache))

        def back():
            if context:
                rewind(cache, context)
            else:
                cache.trim(cache.offset)

        out.append(_t(run, m, setup=back))
        del x
    return out


def time_embed(embed, vocab_size: int, m: Method, batches: tuple[int, ...] = (),
               chunks: tuple[int, ...] = ()):
    """(prefill timings per P, decode timings per C, decode timings per extra batch size,
    timings per chunk size). Decode does not depend on the context (measured once, reported at
    every context), nor a chunk on the tokens before it."""

    def tokens(b, p, seed):
        ids = mx.random.randint(0, vocab_size, (b, p), key=mx.random.key(seed))
        mx.eval(ids)
        return _t(lambda: mx.eval(embed(ids)), m)

    prefill = [tokens(m.batch, p, m.seed + i) for i, p in enumerate(m.prefill_tokens)]
    one = tokens(m.batch, 1, m.seed + 7)
    return (prefill, [one] * len(m.decode_context), [tokens(b, 1, m.seed + 7) for b in batches],
            [tokens(m.batch, c, m.seed + 30 + i) for i, c in enumerate(chunks)])


def head_fn(norm, lm_head, embed):
    """The head as a function of the last hidden states: final norm + LM head (tied: the
    embedding used as a linear layer)."""
    proj = lm_head if lm_head is not None else embed.as_linear

    def head(h):
        return proj(norm(h[:, -1:, :]))

    return head


def time_head(head, hidden_size: int, dtype, m: Method, batches: tuple[int, ...] = (),
              chunks: tuple[int, ...] = ()):
    """As `time_embed`, for the final norm + LM head (B streams: B last positions)."""

    def tokens(b, p, seed):
        x = hidden(b, p, hidden_size, dtype, seed=seed)
        return _t(lambda: mx.eval(head(x)), m)

    prefill = [tokens(m.batch, p, m.seed + 50 + i) for i, p in enumerate(m.prefill_tokens)]
    one = tokens(m.batch, 1, m.seed + 99)
    return (prefill, [one] * len(m.decode_context), [tokens(b, 1, m.seed + 99) for b in batches],
            [tokens(m.batch, c, m.seed + 80 + i) for i, c in enumerate(chunks)])


def kv_bytes_per_token(block, template_cache, x1: mx.array) -> int:
    """True KV-cache bytes one token adds to this block's cache (keys + values; the cache's
    256-token allocation steps are not counted). 0 for blocks without a KV-style cache."""
    probe = copy.deepcopy(template_cache)
    out = block(x1, _mask(x1, probe), probe)
    mx.eval(out, *cache_arrays(probe))
    k, v = getattr(probe, "keys", None), getattr(probe, "values", None)
    if not isinstance(k, mx.array) or not isinstance(v, mx.array) or k.ndim != 4:
        return 0
    return int(k.shape[1] * k.shape[3] * k.itemsize + v.shape[1] * v.shape[3] * v.itemsize)
