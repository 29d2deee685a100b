"""One pipeline stage: the program each rank of `exo-bridge run` executes.

Started by `exo_bridge.runner.run` (one process per plan stage) with the MLX ring backend's
environment (`MLX_HOSTFILE`, `MLX_RANK`) or by `mlx.launch`. The job comes base64-encoded on
the command line (`--job B64`) so the same command works on a remote host.

What a rank does:

1. Loads ONLY what its stage needs: its transformer blocks; rank 0 also the embedding, the last
   rank also the final norm and the LM head. A local model directory is loaded lazily with
   `mlx_lm.utils.load_model(path, lazy=True)` and only the stage's arrays are materialised; a
   built-in model (a config dict, no weights on disk) gets deterministic random weights derived
   from each parameter's full name, so every process agrees on the same model without any file.
2. Runs the pipeline (our own stage wrapper, works for llama-like mlx-lm models: `model.model`
   with `embed_tokens`, `layers`, `norm` and `lm_head` or tied embeddings):
   rank 0 embeds the tokens and runs its blocks, sends the activation (1, L, hidden) to rank 1
   with `mx.distributed.send`; each middle rank receives, runs its blocks, sends on; the last
   rank applies norm + head, takes the greedy token and sends its id back to rank 0 (the ring
   closure, a neighbour in the ring). Every send / recv goes to a ring neighbour.
3. Warm-up (short prefill + a few decode steps, caches then reset), a barrier (`all_sum`), then
   the measured run: prefill of the prompt and greedy decoding of `max_tokens` tokens.
   With `"serve": true` in the job, B streams instead, under a runtime batching pattern
   (batch-through or micro-batch; exo_bridge.runner.streams drives `Stage.advance`).
4. Prints one line `EXO_BRIDGE_RESULT {json}` on stdout: rank 0 the tokens and the token
   arrival times, every rank its per-step compute times (time from input available to output
   evaluated, so waiting on the network is excluded) for diagnosing prediction errors.

A hybrid plan's job carries `groups` (tensor-parallel groups inside the pipeline): its ranks
run `exo_bridge.runner.tensor`'s stage instead (one hook in `run`; design in that module).

Timing: TTFT = from the start of the prefill on rank 0 to the first token id arriving back at
rank 0; TPOT = (arrival of the last token - arrival of the first) / (max_tokens - 1).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import zlib
from typing import Any

import mlx.core as mx

RESULT_TAG = "EXO_BRIDGE_RESULT "
PROTOCOLS = ("ring", "exo-legacy", "exo-current")
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_CODES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
_FROM_CODE = {v: k for k, v in _CODES.items()}


def ring_socket_fds() -> list[int]:
    """Duplicates of this process's connected TCP sockets (the ring backend's, after init)."""
    import socket as _s

    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = _s.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            ok = sock.type == _s.SOCK_STREAM and sock.getpeername()
        except OSError:
            ok = False
        if ok:
            fds.append(sock.detach())
        else:
            sock.close()
    return fds


def wait_readable(fds: list[int], timeout_s: float | None = None) -> None:
    """Sleep until a ring socket has data. MLX's ring `recv` busy-waits (a waiting rank burns a
    whole core, measured: 1.97 s CPU in a 2 s wait), which on shared cores or under a CPU quota
    steals time from the rank that computes; blocking here first makes waiting free."""
    import select

    if fds:
        select.select(fds, [], [], timeout_s)


def encode_job(job: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(job).encode()).decode()


def decode_job(b64: str) -> dict[str, Any]:
    return json.loads(base64.b64decode(b64.encode()).decode())


# ----------------------------------------------------------------------------------- model


def _inner(model):
    """The module holding embed_tokens / layers / norm (llama: model.model)."""
    inner = getattr(model, "model", model)
    for attr in ("embed_tokens", "layers", "norm"):
        if not hasattr(inner, attr):
            raise RuntimeError(f"model class {type(model).__name__} has no .model.{attr}: the stage "
                               "wrapper supports llama-like mlx-lm models only")
    return inner


def _random_fill(module, prefix: str, seed: int, dtype) -> None:
    """Deterministic random weights for `module`, keyed by each parameter's full name.

    Norm weights are ones, biases zeros, matrices normal(0, 1/sqrt(fan_in)); the same name gives
    the same array in every process, whatever else that process holds.
    """
    from mlx.utils import tree_flatten, tree_unflatten

    new = []
    for name, arr in tree_flatten(module.parameters()):
        full = f"{prefix}.{name}" if prefix else name
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            val = mx.ones(arr.shape, dtype=dtype)
        elif leaf == "bias":
            val = mx.zeros(arr.shape, dtype=dtype)
        else:
            key = mx.random.key((seed * 1000003 + zlib.crc32(full.encode())) & 0xFFFFFFFF)
            std = 1.0 / max(1.0, float(arr.shape[-1])) ** 0.5
            if "embed" in full:
                std = 1.0
            val = (mx.random.normal(arr.shape, key=key) * std).astype(dtype)
        new.append((name, val))
    module.update(tree_unflatten(new))


def load_stage(spec: dict[str, Any], start: int, end: int, first: bool, last: bool):
    """Build the model and materialise only blocks [start, end) (+ embed / norm+head).

    Returns (model, inner, layers) where `layers` is the stage's list of blocks.
    """
    from mlx.utils import tree_flatten

    if spec["source"] == "dir":
        from pathlib import Path

        from mlx_lm.utils import load_model

        model, _ = load_model(Path(spec["path"]), lazy=True)
        inner = _inner(model)
    else:
        from mlx_lm.utils import _get_classes

        config = dict(spec["config"])
        config.pop("quantization", None)
        Model, Args = _get_classes(config)
        model = Model(Args.from_dict(config))
        inner = _inner(model)
        dtype = _DTYPES[spec.get("dtype", "float32")]
        seed = int(spec.get("seed", 0))
        for i in range(start, end):
            _random_fill(inner.layers[i], f"model.layers.{i}", seed, dtype)
        tied = not hasattr(model, "lm_head")
        if first or (last and tied):
            _random_fill(inner.embed_tokens, "model.embed_tokens", seed, dtype)
        if last:
            _random_fill(inner.norm, "model.norm", seed, dtype)
            if not tied:
                _random_fill(model.lm_head, "lm_head", seed, dtype)
    layers = list(inner.layers[start:end])
    keep = list(layers)
    if first:
        keep.append(inner.embed_tokens)
    if last:
        keep.append(inner.norm)
        keep.append(getattr(model, "lm_head", inner.embed_tokens))
    arrays = [a for m in keep for _, a in tree_flatten(m.parameters())]
    mx.eval(arrays)
    return model, inner, layers


def make_caches(model, layers, start: int, end: int):
    if hasattr(model, "make_cache"):
        return list(model.make_cache()[start:end])
    from mlx_lm.models.cache import KVCache

    return [KVCache() for _ in layers]


def head_logits(model, inner, h):
    h = inner.norm(h)
    if hasattr(model, "lm_head"):
        return model.lm_head(h)
    return inner.embed_tokens.as_linear(h)


# -------------------------------------------------------------------------------- pipeline


def as_batch(tokens) -> list[list[int]]:
    """Token ids as a batch: [t, ...] (one stream) or [[t, ...], ...] (one row per stream)."""
    return tokens if tokens and isinstance(tokens[0], list) else [tokens]


class Stage:
    """This rank's part of the pipeline with its KV caches and step timings.

    Built in parts: `__init__` (build: load the stage's arrays, find the ring sockets),
    the messaging (`recv_input` / `send_output` / `send_tokens` / `recv_tokens`, each in the
    protocol's format), and the passes (`advance`: input -> blocks -> output for one batch of
    streams with the caches it is given; `step`: `advance` + rank 0's token receive, one
    stream). Multi-stream schedules (exo_bridge.runner.streams) drive `advance` directly.
    """

    def __init__(self, job: dict[str, Any], rank: int, size: int, group):
        self.rank, self.size, self.group = rank, size, group
        self.start, self.end = job["stages"][rank]
        self.first, self.last = rank == 0, rank == size - 1
        self.protocol = job.get("protocol", "ring")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        every = self.protocol == "exo-current"  # every rank keeps embedding, norm and head
        self.model, self.inner, self.layers = load_stage(job["model"], self.start, self.end,
                                                         self.first or every, self.last or every)
        self.fds = ring_socket_fds() if (group is not None and os.name == "posix"
                                         and os.path.isdir("/proc/self/fd")) else []
        self.hidden = None  # set from the first activation
        self.act_dtype = None
        self.header_sent = False  # the one-time [dtype, hidden] header to the next rank
        self.reset()

    def reset(self) -> None:
        self.caches = self.new_caches()
        self.compute_s: list[float] = []
        self.wait_s: list[float] = []
        self.passes: list[tuple[str, int]] = []  # (phase, batch) of each compute_s entry
        self.head_s: list[float] = []  # exo-current: this rank's own head per pass
        self.message_s: list[float] = []  # exo-legacy: encode + decode time per message

    def new_caches(self):
        """Fresh KV caches for this stage's blocks (one set per stream batch)."""
        return make_caches(self.model, self.layers, self.start, self.end)

    # -- messaging -------------------------------------------------------------------------
    def _recv_activation(self, L: int, batch: int = 1):
        src = self.rank - 1
        if self.act_dtype is None:  # one-time header: [dtype code, hidden size]
            wait_readable(self.fds)
            hdr = mx.distributed.recv((2,), mx.int32, src, group=self.group)
            mx.eval(hdr)
            code, hidden = hdr.tolist()
            self.act_dtype, self.hidden = _FROM_CODE[code], hidden
        else:  # (the activation follows the header at once: no wait before it)
            wait_readable(self.fds)
        h = mx.distributed.recv((batch, L, self.hidden), self.act_dtype, src, group=self.group)
        mx.eval(h)
        return h

    def _send_activation(self, h) -> None:
        dst = self.rank + 1
        if not self.header_sent:
            self.header_sent = True
            hdr = mx.array([_CODES[h.dtype], h.shape[-1]], dtype=mx.int32)
            mx.eval(mx.distributed.send(hdr, dst, group=self.group))
        mx.eval(mx.distributed.send(h, dst, group=self.group))

    # exo-legacy: every message as legacy exo's gRPC carries it (numpy bytes + shape + dtype)
    def _send_framed(self, h, dst: int) -> None:
        import numpy as np

        t0 = time.perf_counter()
        mx.eval(h)
        bf16 = h.dtype == mx.bfloat16
        a = np.array(h.view(mx.uint16) if bf16 else h)
        meta = json.dumps({"shape": list(a.shape), "dtype": "bfloat16" if bf16 else str(a.dtype),
                           "shard": [self.start, self.end], "request_id": "exo-bridge"}).encode()
        payload = mx.array(np.frombuffer(meta + a.tobytes(), dtype=np.uint8))
        hdr = mx.array([len(meta), payload.size], dtype=mx.int32)
        mx.eval(payload, hdr)
        self.message_s.append(time.perf_counter() - t0)
        mx.eval(mx.distributed.send(hdr, dst, group=self.group))
        mx.eval(mx.distributed.send(payload, dst, group=self.group))

    def _recv_framed(self, src: int):
        import numpy as np

        wait_readable(self.fds)
        hdr = mx.distributed.recv((2,), mx.int32, src, group=self.group)
        mx.eval(hdr)
        n_meta, n = hdr.tolist()
        buf = mx.distributed.recv((n,), mx.uint8, src, group=self.group)
        mx.eval(buf)
        t0 = time.perf_counter()
        raw = np.array(buf).tobytes()
        meta = json.loads(raw[:n_meta])
        bf16 = meta["dtype"] == "bfloat16"
        a = np.frombuffer(raw[n_meta:], dtype=np.uint16 if bf16 else meta["dtype"])
        h = mx.array(a.reshape(meta["shape"]))
        h = h.view(mx.bfloat16) if bf16 else h
        mx.eval(h)
        self.message_s.append(time.perf_counter() - t0)
        return h

    def recv_input(self, L: int, batch: int = 1):
        """The previous rank's activation (batch, L, hidden) in the protocol's format."""
        if self.protocol == "exo-legacy":
            return self._recv_framed(self.rank - 1)
        return self._recv_activation(L, batch)

    def send_output(self, h) -> None:
        """This stage's activation to the next rank."""
        if self.protocol == "exo-legacy":
            self._send_framed(h, self.rank + 1)
        else:
            self._send_activation(h)

    def send_tokens(self, tok) -> None:
        """The last rank's sampled ids (batch,) back to rank 0 (the ring closure)."""
        if self.protocol == "exo-legacy":  # legacy exo forwards a token as a (1, 1) tensor
            self._send_framed(tok.reshape(-1, 1), 0)
        else:
            mx.eval(mx.distributed.send(tok, 0, group=self.group))

    def recv_tokens(self, batch: int = 1):
        """Rank 0: the ids (batch,) the last rank sampled."""
        if self.protocol == "exo-legacy":
            return self._recv_framed(self.size - 1).reshape(-1)
        wait_readable(self.fds)
        tok = mx.distributed.recv((batch,), mx.int32, self.size - 1, group=self.group)
        mx.eval(tok)
        return tok

    # -- passes ----------------------------------------------------------------------------
    def forward(self, h, caches):
        """This stage's blocks over h (batch, L, hidden) with `caches` (one per block)."""
        from mlx_lm.models.base import create_attention_mask

        mask = create_attention_mask(h, caches[0] if caches else None)
        for layer, c in zip(self.layers, caches):
            h = layer(h, mask, cache=c)
        return h

    def greedy(self, h):
        """Norm + head over the last position, greedy ids (batch,) as int32."""
        logits = head_logits(self.model, self.inner, h)
        return mx.argmax(logits[:, -1, :], axis=-1).astype(mx.int32)

    def advance(self, tokens, L: int, caches=None, batch: int = 1, phase: str | None = None):
        """One pass of `batch` streams over L new tokens through this stage: rank 0 embeds
        `tokens` (a list, or one list per stream), the others receive; the blocks run with
        `caches` (default: the single-stream caches); the output goes to the next rank, or on
        the last rank the greedy ids are sampled and sent back to rank 0 (and returned).
        Times the compute (input available -> output evaluated) as (phase, batch)."""
        caches = self.caches if caches is None else caches
        t_in = time.perf_counter()
        if self.first:
            h = self.inner.embed_tokens(mx.array(as_batch(tokens), dtype=mx.int32))
        else:
            h = self.recv_input(L, batch)
        t0 = time.perf_counter()
        h = self.forward(h, caches)
        tok = None
        if self.last:
            tok = self.greedy(h)
            mx.eval(tok)
        else:
            mx.eval(h)
        self.compute_s.append(time.perf_counter() - t0)
        self.wait_s.append(t0 - t_in)
        self.passes.append((phase or ("prefill" if L > 1 else "decode"), batch))
        if not self.last:
            self.send_output(h)
        elif self.size > 1:
            self.send_tokens(tok)
        return tok

    def step(self, tokens: list[int] | None, L: int) -> int | None:
        """One pipeline pass over L new tokens of one stream. Rank 0 passes the tokens and gets
        the next id."""
        tok = self.advance(tokens, L)
        if self.first:
            if self.size > 1:
                tok = self.recv_tokens(1)
            return int(tok.item())
        return None

    def exo_current_pass(self, tokens, gather: bool):
        """One forward call as current exo's pipeline runs it (every rank, its own tokens):
        every rank embeds the tokens; rank > 0 then takes the previous rank's activation
        instead; runs its blocks; sends to the next rank; with `gather` (decode) all-gathers
        the hidden states and keeps the last rank's; then norm + LM head over the positions
        and the greedy token on EVERY rank. `tokens`: one stream's list (returns an int) or one
        list per stream (a batch, with `self.caches` holding the batch: returns a list)."""
        batched = bool(tokens) and isinstance(tokens[0], list)
        t_in = time.perf_counter()
        h = self.inner.embed_tokens(mx.array(as_batch(tokens), dtype=mx.int32))
        if not self.first:
            mx.eval(h)
            wait_readable(self.fds)
            h = mx.distributed.recv_like(h, self.rank - 1, group=self.group)
            mx.eval(h)
        t0 = time.perf_counter()
        h = self.forward(h, self.caches)
        mx.eval(h)
        self.compute_s.append(time.perf_counter() - t0)
        self.wait_s.append(t0 - t_in)
        self.passes.append(("prefill" if h.shape[1] > 1 else "decode", h.shape[0]))
        if not self.last:
            mx.eval(mx.distributed.send(h, self.rank + 1, group=self.group))
        if gather and self.size > 1:
            if not self.last:  # nothing else can arrive first: sleep instead of spinning
                wait_readable(self.fds)
            h = mx.distributed.all_gather(h, group=self.group)[-h.shape[0]:]
            mx.eval(h)
        t_h = time.perf_counter()
        tok = self.greedy(h)
        mx.eval(tok)
        self.head_s.append(time.perf_counter() - t_h)
        return tok.tolist() if batched else int(tok.item())


def generate(stage: Stage, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """Prefill + greedy decode; rank 0 returns tokens and arrival times, others None fields."""
    times: list[float] = []
    tokens: list[int] = []
    t_start = time.perf_counter()
    cur = stage.step(prompt, len(prompt))
    for i in range(max_tokens):
        if stage.first:
            times.append(time.perf_counter() - t_start)
            tokens.append(cur)
        if i == max_tokens - 1:
            break
        cur = stage.step([cur] if stage.first else None, 1)
    return {"tokens": tokens, "token_times_s": times}


def generate_exo_current(stage: Stage, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """Current exo's sequence (src/exo/worker/engines/mlx/generator/generate.py at b5375f8):
    prefill = prompt[:-1] then prompt[-1] with no all-gather (each rank runs its head on its
    own hidden state), trim the KV caches by 2, a barrier, then decode from prompt[-2:] with
    the all-gather every step; the first token comes from the prompt[-1] step. Every rank
    returns the same tokens; rank 0's arrival times are measured."""
    if len(prompt) < 2:
        raise ValueError("exo-current's protocol needs a prompt of at least 2 tokens")
    times: list[float] = []
    tokens: list[int] = []
    t_start = time.perf_counter()
    stage.exo_current_pass(prompt[:-1], gather=False)
    stage.exo_current_pass(prompt[-1:], gather=False)
    for c in stage.caches:
        c.trim(2)
    if stage.group is not None:
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=stage.group))
    stage.exo_current_pass(prompt[-2:-1], gather=True)
    cur = stage.exo_current_pass(prompt[-1:], gather=True)
    stage.first_decode_pass = len(stage.compute_s)
    for i in range(max_tokens):
        times.append(time.perf_counter() - t_start)
        tokens.append(cur)
        if i == max_tokens - 1:
            break
        cur = stage.exo_current_pass([cur], gather=True)
    return {"tokens": tokens, "token_times_s": times}


def run(job: dict[str, Any], rank: int, size: int, group) -> dict[str, Any]:
    t_load = time.perf_counter()
    if job.get("groups"):  # a hybrid plan: tensor-parallel groups (exo_bridge.runner.tensor)
        from exo_bridge.runner.tensor import make_tensor_stage

        stage = make_tensor_stage(job, rank, size, group)
    else:
        stage = Stage(job, rank, size, group)
    load_s = time.perf_counter() - t_load
    if job.get("serve"):  # many streams: the runtime batching patterns (streams.py)
        from exo_bridge.runner.streams import serve

        return serve(stage, job, load_s)
    prompt = job["prompt"]
    wp, wt = int(job.get("warmup_prompt", 8)), int(job.get("warmup_tokens", 2))
    gen = generate_exo_current if stage.protocol == "exo-current" else generate
    if wt > 0:
        gen(stage, prompt[: max(2, min(wp, len(prompt)))], wt)
    stage.reset()
    stage.first_decode_pass = 1
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group))  # barrier
    out = gen(stage, prompt, int(job["max_tokens"]))
    k = stage.first_decode_pass
    res: dict[str, Any] = {
        "rank": rank, "stage": [stage.start, stage.end], "load_s": load_s,
        "protocol": stage.protocol,
        # every pass before the first token (exo-current: 4 passes, as its prediction sums)
        "prefill_compute_s": sum(stage.compute_s[:k]) if stage.compute_s else None,
        "decode_compute_s": stage.compute_s[k:],
        "head_s": stage.head_s[k:], "message_s": stage.message_s,
        "prefill_wait_s": stage.wait_s[0] if stage.wait_s else None,
        "peak_memory_bytes": mx.get_peak_memory(),
    }
    if job.get("groups"):
        from exo_bridge.runner.tensor import tensor_result

        res.update(tensor_result(stage))
    if stage.protocol == "exo-current":
        res["all_tokens"] = out["tokens"]  # every rank samples: they must agree
    if rank == 0:
        times = out["token_times_s"]
        n = len(times)
        res.update(tokens=out["tokens"], token_times_s=times, ttft_s=times[0],
                   tpot_s=(times[-1] - times[0]) / (n - 1) if n > 1 else None)
    return res


def _bare_stage(rank: int, size: int, group) -> Stage:
    """A Stage with its messaging state and no model (for the message ping-pong)."""
    st = Stage.__new__(Stage)
    st.rank, st.size, st.group = rank, size, group
    st.start = st.end = 0
    st.first, st.last = rank == 0, rank == size - 1
    st.protocol = "exo-legacy"
    st.fds = ring_socket_fds() if os.path.isdir("/proc/self/fd") else []
    st.hidden = st.act_dtype = None
    st.header_sent = False
    st.message_s = []
    return st


def message_pingpong(job: dict[str, Any], rank: int, size: int, group) -> dict[str, Any]:
    """The exo-legacy path's per-message overhead, measured against the plain ring path between
    the two ranks: rank 0 sends a (1, 1, hidden) activation, rank 1 answers with a token id,
    alternately as the ring protocol does (raw arrays) and as the exo-legacy path does (framed
    numpy messages, the token as a (1, 1) tensor). overhead = (median legacy round trip - median
    ring round trip) / 2 (two messages per round). Rank 0 returns it with both medians."""
    import statistics

    st = _bare_stage(rank, size, group)
    hidden, repeats = int(job["hidden"]), int(job.get("repeats", 50))
    h = mx.random.normal((1, 1, hidden)).astype(_DTYPES[job.get("dtype", "float32")])
    tok = mx.array([7], dtype=mx.int32)
    mx.eval(h, tok)
    rtt: dict[str, list[float]] = {"ring": [], "exo-legacy": []}
    for i in range(repeats + 2):  # 2 warm-up rounds per mode
        for mode in ("ring", "exo-legacy"):
            legacy = mode == "exo-legacy"
            t0 = time.perf_counter()
            if rank == 0:
                st._send_framed(h, 1) if legacy else st._send_activation(h)
                if legacy:
                    st._recv_framed(1)
                else:
                    wait_readable(st.fds)
                    mx.eval(mx.distributed.recv((1,), mx.int32, 1, group=group))
                if i >= 2:
                    rtt[mode].append(time.perf_counter() - t0)
            else:
                if legacy:
                    st._recv_framed(0)
                    st._send_framed(tok.reshape(1, 1), 0)
                else:
                    st._recv_activation(1)
                    mx.eval(mx.distributed.send(tok, 0, group=group))
    if rank != 0:
        return {"rank": rank}
    ring, leg = statistics.median(rtt["ring"]), statistics.median(rtt["exo-legacy"])
    return {"rank": 0, "ring_rtt_s": ring, "legacy_rtt_s": leg,
            "message_overhead_s": max(0.0, (leg - ring) / 2), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="exo_bridge.runner.stage_worker",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--job", required=True, help="base64 JSON job from exo_bridge.runner.run")
    args = ap.parse_args(argv)
    job = decode_job(args.job)
    size = len(job["stages"])
    group = None
    rank = 0
    if size > 1:
        group = mx.distributed.init(backend=job.get("backend", "ring"), strict=True)
        rank = group.rank()
        if group.size() != size:
            print(f"stage_worker: the ring has {group.size()} ranks but the plan {size} stages",
                  file=sys.stderr)
            return 2
    if job.get("kind") == "message-pingpong":
        res = message_pingpong(job, rank, size, group)
    else:
        res = run(job, rank, size, group)
    print(RESULT_TAG + json.dumps(res), flush=True)
    sys.stdout.flush()
    # The ring backend's sockets may block interpreter teardown; results are out, so leave now.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
