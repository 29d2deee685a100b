"""Bad input on every option of every command: one line on stderr naming the option, exit 2.

The options are enumerated from the commands' own argparse parsers, so a new option without a
typed validator (profiler.options) fails `test_every_option_has_a_validator`, and a new numeric
option is fed the whole bad-value corpus automatically: 0, negative, below / above its range,
NaN, +-Infinity, a 400-digit integer, a word, a fraction where a whole number belongs, an empty
value. Calls are in-process (no MLX is started: options are checked before anything runs); a
few real subprocesses check the console entry points end to end. Random text (hypothesis) goes
through every validator: a value is accepted within its bounds or refused with one line, never
an exception of another kind.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_bridge import cli as bridge_cli
from exo_bridge import profile_link
from exo_bridge.runner import run as runner
from graphsplit import cli as split_cli
from graphsplit import whatif
from profiler import cli as profile_cli
from profiler import options as o
from profiler.errors import UserError

SENTINEL = "--zz-not-an-option"  # parsed last: a wrongly accepted value errors on this instead

# Every command: (parser, how its main is called with argv for one subcommand prog)
COMMANDS = {
    "profile-model": (profile_cli.build_parser, profile_cli.main, ["/nonexistent/config.json"]),
    "split-model": (split_cli.build_parser, split_cli.main, ["/nonexistent/cluster.json"]),
    "exo-bridge": (bridge_cli.build_parser, bridge_cli.main, []),
    "exo-bridge run": (runner.build_parser, runner.main, ["/nonexistent/plan.json"]),
    "profile-link": (profile_link.build_parser, profile_link.main, []),
    "what-if": (whatif.build_parser, whatif.main, ["/nonexistent/cluster.json"]),
}
# argv before the option, per (sub)command prog
PREFIX = {
    "profile-model": ["/nonexistent/config.json"],
    "split-model": ["/nonexistent/cluster.json"],
    "exo-bridge compare": ["compare", "/nonexistent/plan.json"],
    "exo-bridge exo-legacy": ["exo-legacy"],
    "exo-bridge strategy-check": ["strategy-check"],
    "exo-bridge place": ["place", "--plan", "/nonexistent/plan.json"],
    "exo-bridge run": ["/nonexistent/plan.json"],
    "profile-link serve": ["serve"],
    "profile-link measure": ["measure", "127.0.0.1:9"],
    "profile-link self-test": ["self-test"],
    "profile-link mlx": ["mlx"],
    "what-if": ["/nonexistent/cluster.json"],
    "profile-link collective": ["collective"],
}
# Commands whose options are checked elsewhere (none today): any option not listed fails this suite.
ELSEWHERE: set[str] = set()

NUMERIC = {"int", "int_choice", "float", "seconds", "port", "grid", "hostport", "node_memory",
           "chip", "link"}


def all_options():
    for cmd, (build, main, _) in COMMANDS.items():
        for prog, action in o.walk_options(build()):
            if prog.split(" --")[0] in ELSEWHERE:
                continue
            yield cmd, prog, action


def bad_values(fn) -> list[str]:
    """The corpus for one validator, from its kind and bounds."""
    kind = fn.kind
    lo, hi = getattr(fn, "lo", None), getattr(fn, "hi", None)
    common = ["nan", "NaN", "inf", "-Infinity", "9" * 400, "-" + "9" * 400, "abc", "", "1e400"]
    if kind in ("int", "int_choice", "port", "grid", "float", "seconds"):
        out = common + [str(hi + (1 if isinstance(hi, int) else hi)), str(lo - 1)]
        if getattr(fn, "lo_open", False):
            out.append(str(lo))  # the open end itself: 0 seconds, a spread of 0
        if kind in ("int", "int_choice", "port", "grid"):
            out += ["1.5", "0x10"]
        if lo is not None and lo > 0:
            out += ["0", "-1"]
        if kind == "int_choice":
            out += [str(v + 1) for v in fn.values if v + 1 not in fn.values][:2]
        if kind == "grid":
            out += ["16,,x", "64,16", ",".join(["1"] * 2), ",".join(str(i) for i in
                                                              range(1, fn.max_len + 2))]
        return out
    if kind == "hostport":
        return ["h:0", "h:65536", "h:-1", "h:nan", "h:" + "9" * 400, ":80", "a b:1", "h:",
                "[::1", ""]
    if kind == "node_memory":
        return ["a:0", "a:-5", "a:nan", "a:inf", "a:" + "9" * 400, "a", ":5", "a:1.5"]
    if kind == "chip":  # what-if --add [NAME=]CHIP
        return ["M5 Ultra 512GB", "M4 Pro", "M4 Pro 32GB", "M4 Max 30c 64GB", "=M4 Pro 48GB",
                "a:b=M4 Pro 48GB", "M4 Pro " + "9" * 400 + "GB", "nan", ""]
    if kind == "link":  # what-if --link A:B=PRESET|LATENCY,BANDWIDTH
        return ["a:b", "a=tb5", "a:a=tb5", ":b=tb5", "a:b:c=tb5", "a:b=tb9", "a:b=0.3ms",
                "a:b=0.3ms,5", "a:b=nanms,5GB/s", "a:b=1e400ms,5GB/s", "a:b=0.3ms,0GB/s",
                "a:b=0.3ms,-5GB/s", "a:b=20000ms,5GB/s", "a:b=1ms," + "9" * 400 + "GB/s", ""]
    return []


def _cases():
    for cmd, prog, action in all_options():
        kind = getattr(action.type, "kind", None)
        if kind not in NUMERIC:
            continue
        for bad in bad_values(action.type):
            yield pytest.param(cmd, prog, action, bad,
                               id=f"{prog}:{(action.option_strings or [action.dest])[0]}={bad[:12]}")


def run_main(main, argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_every_option_has_a_validator():
    missing = []
    for cmd, (build, _, _) in COMMANDS.items():
        missing += [m for m in o.unvalidated(build())
                    if not any(m.startswith(e + " ") for e in ELSEWHERE)]
    assert missing == [], f"options without a typed validator or choices: {missing}"


def test_the_corpus_covers_every_numeric_option():
    covered = {(p, a.dest) for _, p, a, _ in (c.values for c in _cases())}
    want = {("profile-model", "batch"), ("profile-model", "prefill_tokens"),
            ("split-model", "streams"), ("exo-bridge run", "timeout"),
            ("exo-bridge run", "streams"), ("exo-bridge run", "micro_batch"),
            ("profile-link serve", "port"), ("profile-link measure", "server"),
            ("exo-bridge strategy-check", "node"), ("profile-link mlx", "rank"),
            ("what-if", "add"), ("what-if", "link"), ("what-if", "streams")}
    assert want <= covered


@pytest.mark.parametrize("cmd, prog, action, bad", list(_cases()))
def test_bad_value_is_one_line_naming_the_option(cmd, prog, action, bad, capsys):
    main = COMMANDS[cmd][1]
    prefix = PREFIX[prog]
    if action.option_strings:
        argv = prefix + [f"{action.option_strings[0]}={bad}", SENTINEL]
        name = action.option_strings[0]
    else:  # a positional: it replaces the prefix's placeholder
        argv = prefix[:-1] + [bad, SENTINEL]
        name = f"argument {action.dest}"
    rc, err = run_main(main, argv, capsys)
    assert rc == 2, (argv, err)
    assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    assert "Traceback" not in err and name in err, (argv, err)
    assert len(err) < 400, err  # a 400-digit value is cut when echoed


@pytest.mark.parametrize("argv, says", [
    (["profile-model"], "the following arguments are required: model"),
    (["profile-model", "x", "--bits", "4", "--no-quant"], "not allowed with argument"),
    (["split-model", "c.json", "--objective", "fastest"], "invalid choice: 'fastest'"),
    (["exo-bridge"], "give a command"),
    (["exo-bridge", "compare"], "required: plan"),
    (["exo-bridge", "strategy-check", "--layers"], "expected one argument"),
    (["profile-link", "measure"], "required: server"),
    (["profile-link", "measure", "h:1", "--repeats", "1\n2"], "'1\\n2'"),
    (["profile-model", "x", "--out", "a\0b"], "NUL byte"),
])
def test_argparse_own_errors_are_one_line(argv, says, capsys):
    cmd, args = argv[0], argv[1:]
    if cmd == "exo-bridge" and args[:1] == ["run"]:
        cmd, args = "exo-bridge run", args[1:]
    rc, err = run_main(COMMANDS[cmd][1], args, capsys)
    assert rc == 2 and err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize("module, argv, says", [
    ("profiler", ["llama-3-8b", "--batch", "nan"], "--batch"),
    ("graphsplit.cli", ["c.json", "--streams", "-1"], "--streams"),
    ("exo_bridge.cli", ["run", "p.json", "--timeout", "inf"], "--timeout"),
    ("exo_bridge.cli", ["strategy-check", "--node", "a:1e999"], "--node"),
    ("exo_bridge.profile_link", ["serve", "--port", "70000"], "--port"),
    ("graphsplit.whatif", ["c.json", "--link", "a:b=tb9"], "--link"),
])
def test_console_entry_points_exit_2_with_one_line(module, argv, says):
    cp = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 2 and "Traceback" not in cp.stderr, cp.stderr
    assert cp.stderr.count("\n") == 1 and says in cp.stderr, cp.stderr


def test_options_module_does_not_import_mlx():
    code = ("import sys, profiler.options, profiler.memfit, profiler.cli, graphsplit.cli, "
            "graphsplit.whatif, exo_bridge.profile_link; sys.exit(1 if 'mlx' in sys.modules or 'mlx.core' in "
            "sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# ------------------------------------------------------------------------- random text

VALIDATORS = [o.int_in(0, 100), o.positive_int(1 << 20), o.int_choice((2, 4, 8)),
              o.float_in(0, 10), o.float_in(0, 1, lo_open=True), o.seconds(3600), o.port(),
              o.int_grid(1, 1 << 22), o.host_port(52900), o.http_url(), o.host(),
              o.node_memory(), o.text(), o.path(), whatif.parse_add, whatif.parse_link]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALIDATORS), st.one_of(
    st.text(max_size=30), st.from_regex(r"-?[0-9]{0,500}(\.[0-9]*)?(e[0-9]+)?", fullmatch=True),
    st.from_regex(r"[a-z0-9.\-\[\]:]{0,20}:[0-9\-]{0,8}", fullmatch=True),
    st.sampled_from(["nan", "inf", "-inf", "Infinity", "1_000", " 7 ", "0x1f", "1e3"])))
def test_validators_accept_in_bounds_or_refuse_in_one_line(fn, text):
    try:
        v = fn(text)
    except argparse.ArgumentTypeError as e:
        assert "\n" not in o.one_line(str(e)) and len(str(e)) < 300
        return
    kind, lo, hi = fn.kind, getattr(fn, "lo", None), getattr(fn, "hi", None)
    if kind in ("int", "port", "int_choice"):
        assert isinstance(v, int) and lo <= v <= hi
    elif kind in ("float", "seconds"):
        assert lo <= v <= hi and v == v and (v > lo or not fn.lo_open)
    elif kind == "grid":
        assert v and all(lo <= x <= hi for x in v) and v == sorted(set(v))
    elif kind == "hostport":
        assert 1 <= v[1] <= 65535 and v[0]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted({(p, a.option_strings[0]) for _, p, a in all_options()
                               if a.option_strings and p in PREFIX})),
       st.text(max_size=40))
def test_any_text_for_any_option_parses_or_is_one_line(opt, text):
    prog, flag = opt
    cmd = next(c for c in COMMANDS if prog == c or prog.startswith(c + " ") and
               not (c == "exo-bridge" and prog == "exo-bridge run"))
    build = COMMANDS[cmd][0]
    argv = ([] if cmd == prog else [prog[len(cmd) + 1:]]) + PREFIX[prog][
        (0 if cmd == prog else 1):] + [f"{flag}={text}"]
    try:
        build().parse_known_args(argv)
    except UserError as e:
        assert "\n" not in str(e) and (flag in str(e) or "argument" in str(e)), str(e)
    except SystemExit as e:  # --help-like values never reach here with flag=value
        raise AssertionError(f"argparse exited for {argv}") from e


# ---------------------------------------------------------------- memory fits, before MLX

def test_grids_and_batches_that_cannot_fit_are_refused_naming_the_option():
    from profiler.memfit import check_fits, estimate
    from profiler.models import resolve_model

    cfg = resolve_model("llama-3-8b").config
    GiB = 1 << 30
    check_fits(cfg, [16, 64], [64, 256], 1, 4, 4, 64, limit=4 * GiB)  # the default: fits
    with pytest.raises(UserError, match="lower --prefill-tokens"):
        check_fits(cfg, [16, 100_000], [64], 1, 4, 4, 64, limit=16 * GiB)
    with pytest.raises(UserError, match=r"lower --decode-context .* or --batch \(512\)"):
        check_fits(cfg, [16], [65536], 512, 4, 4, 64, limit=16 * GiB)
    big = dict(cfg, hidden_size=1 << 20, intermediate_size=1 << 22)
    with pytest.raises(UserError, match="smaller model or quantize"):
        check_fits(big, [16], [64], 1, 4, None, 64, limit=16 * GiB)
    # 70B unquantized bfloat16 profiles one block at a time: about 2 GiB, as measured (2.1)
    e = estimate(resolve_model("llama-3-70b").config, 64, 256, 1, 2, None, 64)
    assert 1.5 * GiB < e.peak < 3 * GiB


def test_profile_model_refuses_a_huge_grid_before_mlx(capsys):
    rc = profile_cli.main(["llama-3-8b", "--prefill-tokens", "4194304"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--prefill-tokens" in err
    assert "this machine allows" in err


# --------------------------------------------------------- outputs and hostfiles, before work

def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me\n")
    rc = split_cli.main([str(tmp_path / "c.json"), "--out", str(blocker / "plan.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--out" in err and "cannot write" in err, err
    assert "cannot read" not in err and blocker.read_text() == "keep me\n"
    rc = profile_cli.main(["llama-3-8b", "--out", str(blocker / "t.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "cannot write" in err and "not a directory" in err


@pytest.mark.parametrize("entries, says", [
    ([["127.0.0.1:99999"], ["127.0.0.1:1"]], "[0][0]: must be an address"),
    ([["127.0.0.1:1"], ["a b:5"]], "[1][0]"),
    ([["127.0.0.1:1"], [7]], "[1][0]"),
    ([["127.0.0.1:1"]], "1 hosts for 2 stages"),
    ({"x": 1}, "hosts: is missing"),
])
def test_runner_hostfile_entries_are_checked(tmp_path, entries, says):
    import json

    hf = tmp_path / "hf.json"
    hf.write_text(json.dumps(entries))
    with pytest.raises(UserError) as e:
        runner.check_hostfile(str(hf), 2)
    assert says in str(e.value) and str(hf) in str(e.value) and "\n" not in str(e.value)


def test_memory_estimate_counts_the_decode_chain():
    """Block decode is timed inside a chain of up to 8 distinct blocks (profile._chain_members):
    the estimate adds the other blocks' weights, no more than a quarter of the limit holds."""
    from profiler import memfit
    from profiler.models import resolve_model

    cfg = resolve_model("llama-3-8b").config
    alone = memfit.estimate(cfg, 64, 256, 1, 4, 4, 64, chain_blocks=1, limit=64 << 30)
    chain = memfit.estimate(cfg, 64, 256, 1, 4, 4, 64, chain_blocks=8, limit=64 << 30)
    block = chain.chain // 7
    assert chain.peak > alone.peak and block > 100 << 20  # 7 more blocks of ~130 MiB
    tight = memfit.estimate(cfg, 64, 256, 1, 4, 4, 64, chain_blocks=8, limit=8 * block)
    assert tight.chain == block  # a quarter of 8 blocks' worth: a chain of 2


def test_memory_estimate_counts_the_batch_grid_chunks_and_tp_slices(capsys):
    """memfit takes decode (and its chain) at every batch of --decode-batch, a prefill chunk at
    its context, and the sliced tensor-parallel copies (profiler.grids)."""
    from profiler import memfit
    from profiler.models import resolve_model

    cfg = resolve_model("llama-3-8b").config
    kw = dict(chain_blocks=8, limit=64 << 30)
    base = memfit.estimate(cfg, 64, 256, 1, 4, 4, 64, **kw)
    wide = memfit.estimate(cfg, 64, 256, 1, 4, 4, 64, decode_batch=(1, 16), **kw)
    assert wide.batch == 16 and wide.decode == 16 * base.decode  # every term scales with B
    kv_ctx = (wide.chain - base.chain) // 7  # 7 more blocks, each with 15 more streams' KV
    assert kv_ctx == 15 * 256 * 2 * 8 * 128 * 4
    chunk = memfit.estimate(cfg, 64, 256, 1, 4, 4, 64, chunk_max=512, chunk_context=8192, **kw)
    assert chunk.prefill > base.prefill and chunk.decode == base.decode
    tp = memfit.estimate(cfg, 64, 256, 1, 4, 4, 64, tp_share=0.5, **kw)
    block = base.chain // 7 - 256 * 2 * 8 * 128 * 4  # a chain block: weights + 1 stream's KV
    assert tp.tp == int(8 * 0.5 * block) and tp.peak == base.peak + tp.tp
    rc = profile_cli.main(["llama-3-8b", "--decode-batch", "1,4096",
                           "--decode-context", "16384"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--decode-batch (largest 4096)" in err, err


@pytest.mark.parametrize("argv, says", [
    (["--tp-shares", "16"], "cannot be cut from llama-3-8b's 8 KV heads"),
    (["--tp-shares", "none", "--prefill-chunk", "0"], "--prefill-chunk"),
    (["--decode-batch", "4,2"], "strictly increasing"),
    (["--chain-blocks", "0"], "--chain-blocks"),
])
def test_profile_model_grid_flags_are_checked_before_mlx(argv, says, capsys):
    rc = profile_cli.main(["llama-3-8b", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and says in err, err
