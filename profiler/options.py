"""Typed command-line options shared by every command, and a parser whose errors are one line.

Every option of `profile-model`, `split-model`, `exo-bridge` and `profile-link` is parsed by one
of the validators below (or has `choices`, or is a flag). A validator turns the text the user
typed into a value, or raises `argparse.ArgumentTypeError` with what is wrong and the accepted
range; `OneLineParser.error` turns that (and argparse's own complaints: unknown option, missing
value) into a `UserError`, so `profiler.errors.guard` prints ONE line naming the option and
exits 2. Nothing here imports MLX: options are checked before any heavy work starts.

Each validator carries `.kind` and its bounds (`.lo`, `.hi`) so that tests can enumerate the
options of every parser and feed each the bad values of its kind
(tests/test_badinput_options.py).

    ap = OneLineParser(prog="tool")
    ap.add_argument("--repeats", type=int_in(1, 1000), default=3)
    ap.add_argument("--timeout", type=seconds(3600), default=30.0)
    ap.add_argument("server", type=host_port(default_port=52900))
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from typing import Any, Callable
from urllib.parse import urlsplit

from profiler.errors import UserError

MAX_SHOWN = 40  # characters of a bad value echoed back (a 400-digit number is cut)


def shown(text: Any) -> str:
    """The user's value, quoted, on one line and cut to MAX_SHOWN characters."""
    s = str(text)
    cut = s if len(s) <= MAX_SHOWN else s[:MAX_SHOWN] + f"... ({len(s)} characters)"
    return repr(cut)


def one_line(message: str) -> str:
    """A message with every line break escaped (a value with a newline stays one line)."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors (bad value, unknown option, missing argument) as one-line UserErrors.

    argparse prints usage and the error on two lines and exits 2 itself; here the error names
    the option ("argument --repeats: ...") and points at --help, and `guard` prints it."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UserError(one_line(f"{self.prog}: {message} (see {self.prog} --help)"))


def _typed(kind: str, fn: Callable[[str], Any], name: str, **meta) -> Callable[[str], Any]:
    fn.kind = kind  # type: ignore[attr-defined]
    fn.__name__ = name  # argparse shows it in "invalid <name> value" for non-ArgumentTypeError
    for k, v in meta.items():
        setattr(fn, k, v)
    return fn


def _bad(msg: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(msg)


_INT_RE = re.compile(r"[+-]?\d+")


def _parse_int(text: str, lo: int, hi: int) -> int:
    t = str(text).strip().replace("_", "")
    if not _INT_RE.fullmatch(t):
        raise _bad(f"{shown(text)} is not a whole number; give one from {lo} to {hi}")
    if len(t.lstrip("+-").lstrip("0")) > len(str(max(abs(lo), abs(hi)))) + 1:
        raise _bad(f"{shown(text)} is out of range; give a whole number from {lo} to {hi}")
    v = int(t)
    if not lo <= v <= hi:
        raise _bad(f"{v} is out of range; give a whole number from {lo} to {hi}")
    return v


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """A whole number lo..hi (no fractions, no NaN, no 400-digit numbers)."""
    return _typed("int", lambda text: _parse_int(text, lo, hi), f"int_{lo}_{hi}", lo=lo, hi=hi)


def positive_int(hi: int) -> Callable[[str], int]:
    """A whole number 1..hi."""
    return int_in(1, hi)


def int_choice(values: tuple[int, ...]) -> Callable[[str], int]:
    """One of a few whole numbers (e.g. --bits 2|3|4|5|6|8)."""
    allowed = ", ".join(map(str, values))

    def parse(text: str) -> int:
        t = str(text).strip()
        v = int(t) if _INT_RE.fullmatch(t) and len(t) < 12 else None
        if v not in values:
            raise _bad(f"{shown(text)} is not one of {allowed}")
        return v

    return _typed("int_choice", parse, "int_choice", values=tuple(values), lo=min(values),
                  hi=max(values))


def float_in(lo: float, hi: float, lo_open: bool = False, unit: str = "") -> Callable[[str], float]:
    """A finite number in [lo, hi] ((lo, hi] with lo_open); no NaN, no infinity."""
    rng = f"{'more than' if lo_open else 'from'} {lo:g}{unit} {'and at most' if lo_open else 'to'}" \
          f" {hi:g}{unit}"

    def parse(text: str) -> float:
        try:
            v = float(str(text).strip())
        except ValueError:
            raise _bad(f"{shown(text)} is not a number; give one {rng}") from None
        if not math.isfinite(v):
            raise _bad(f"{shown(text)} is not a finite number; give one {rng}")
        if v < lo or v > hi or (lo_open and v == lo):
            raise _bad(f"{v:g}{unit} is out of range; give a number {rng}")
        return v

    return _typed("float", parse, "float", lo=lo, hi=hi, lo_open=lo_open)


def seconds(hi: float) -> Callable[[str], float]:
    """A duration in seconds, more than 0 and at most hi."""
    f = float_in(0.0, hi, lo_open=True, unit=" s")
    f.kind = "seconds"  # type: ignore[attr-defined]
    return f


def int_grid(lo: int, hi: int, max_len: int = 32,
             none: bool = False) -> Callable[[str], list[int]]:
    """Comma-separated whole numbers lo..hi, strictly increasing, at least one, at most max_len.
    With `none`, the word "none" is accepted too and means the empty list (a grid turned off)."""

    def parse(text: str) -> list[int]:
        if none and str(text).strip().lower() == "none":
            return []
        items = [v for v in str(text).replace(" ", "").split(",") if v]
        if not items:
            raise _bad(f"{shown(text)} has no values; give comma-separated whole numbers, "
                       "e.g. 16,64")
        if len(items) > max_len:
            raise _bad(f"{len(items)} values is too many; give at most {max_len}")
        out = []
        for it in items:
            try:
                out.append(_parse_int(it, lo, hi))
            except argparse.ArgumentTypeError as e:
                raise _bad(f"in {shown(text)}: {e}") from None
        if any(b <= a for a, b in zip(out, out[1:])):
            raise _bad(f"{shown(text)} must be strictly increasing, e.g. 16,64")
        return out

    return _typed("grid", parse, "grid", lo=lo, hi=hi, max_len=max_len, none=none)


_HOST_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?")


def check_host(h: str) -> str:
    """A host name or IP address (brackets around IPv6 allowed); raises ArgumentTypeError."""
    h = h.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    if not _HOST_RE.fullmatch(h) or h.replace(".", "").isdigit():
        raise _bad(f"{shown(h)} is not a host name or IP address, e.g. 192.168.1.2 or "
                   "studio.local")
    return h


def host() -> Callable[[str], str]:
    return _typed("host", check_host, "host")


def port(lo: int = 1) -> Callable[[str], int]:
    """A TCP port lo..65535 (1 unless 0 = "any free port" makes sense)."""
    f = int_in(lo, 65535)
    f.kind = "port"  # type: ignore[attr-defined]
    return f


def host_port(default_port: int) -> Callable[[str], tuple[str, int]]:
    """HOST[:PORT] (IPv6 as [addr]:port) -> (host, port); port 1..65535, default_port if none."""

    def parse(text: str) -> tuple[str, int]:
        t = str(text).strip()
        m = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", t)
        if m:
            h, p = m.group(1), m.group(2)
        elif t.count(":") == 1:
            h, p = t.split(":")
        elif t.count(":") > 1:
            try:  # a bare IPv6 address, no port
                ipaddress.ip_address(t)
                h, p = t, None
            except ValueError:
                raise _bad(f"{shown(t)} is not HOST:PORT (write an IPv6 address as "
                           "[addr]:port)") from None
        else:
            h, p = t, None
        if not h:
            raise _bad(f"{shown(t)} has no host; give HOST[:PORT], e.g. studio.local:{default_port}")
        try:
            h = check_host(h)
        except argparse.ArgumentTypeError as e:
            raise _bad(f"{e}; give HOST[:PORT]") from None
        if p is None:
            return h, default_port
        if not p.strip():
            raise _bad(f"{shown(t)} has an empty port; give HOST:PORT with a port 1..65535")
        try:
            return h, _parse_int(p, 1, 65535)
        except argparse.ArgumentTypeError as e:
            raise _bad(f"port in {shown(t)}: {e}") from None

    return _typed("hostport", parse, "host_port", lo=1, hi=65535, default_port=default_port)


def http_url() -> Callable[[str], str]:
    """An http:// or https:// URL with a host (and an optional port 1..65535)."""

    def parse(text: str) -> str:
        t = str(text).strip()
        try:
            u = urlsplit(t)
            p = u.port  # ValueError when out of range or not a number
        except ValueError:
            raise _bad(f"{shown(t)} has a port that is not a number from 1 to 65535, e.g. "
                       "http://studio.local:52415") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise _bad(f"{shown(t)} is not an http:// URL with a host, e.g. "
                       "http://studio.local:52415")
        if p == 0:
            raise _bad(f"{shown(t)}: port 0 is out of range; use 1..65535")
        try:
            check_host(u.hostname)
        except argparse.ArgumentTypeError as e:
            raise _bad(f"host in {shown(t)}: {e}") from None
        return t.rstrip("/")

    return _typed("url", parse, "url")


def text(what: str = "value") -> Callable[[str], str]:
    """Free text (a name, an id): not empty, no control characters."""

    def parse(t: str) -> str:
        if not str(t).strip():
            raise _bad(f"empty {what}; give one")
        if any(ord(c) < 32 for c in str(t)):
            raise _bad(f"{shown(t)} contains a control character; give a plain {what}")
        return str(t)

    return _typed("text", parse, "text", what=what)


def path(what: str = "file") -> Callable[[str], str]:
    """A file or directory path: not empty, no NUL byte or line break (the file itself is
    checked where it is read, with its own one-line messages)."""

    def parse(t: str) -> str:
        if not str(t).strip():
            raise _bad(f"empty path; give a {what}")
        if any(c in str(t) for c in "\0\n\r"):
            raise _bad(f"{shown(t)} contains a NUL byte or a line break; give a {what} path")
        return str(t)

    return _typed("path", parse, "path", what=what)


def node_memory() -> Callable[[str], tuple[str, int]]:
    """ID:MEMORY_MB -> (id, MB) with MB a whole number 1..2**40."""

    def parse(t: str) -> tuple[str, int]:
        node, sep, mem = str(t).rpartition(":")
        if not sep or not node.strip():
            raise _bad(f"{shown(t)} is not ID:MEMORY_MB, e.g. studio:65536")
        try:
            text("node id")(node)
            return node, _parse_int(mem, 1, 1 << 40)
        except argparse.ArgumentTypeError as e:
            raise _bad(f"memory in {shown(t)}: {e} (megabytes, e.g. studio:65536)") from None

    return _typed("node_memory", parse, "node_memory", lo=1, hi=1 << 40)


def json_sizes(max_bytes: int) -> Callable[[str], dict[str, int]]:
    """A JSON object {label: bytes} with 1..max_bytes each (profile-link mlx's hidden --sizes)."""
    import json

    def parse(t: str) -> dict[str, int]:
        try:
            d = json.loads(t)
        except ValueError:
            raise _bad(f"{shown(t)} is not JSON; give {{\"label\": bytes, ...}}") from None
        if not isinstance(d, dict) or not d or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= max_bytes
                for v in d.values()):
            raise _bad(f"{shown(t)}: give a JSON object of byte counts 1..{max_bytes}")
        return {str(k): int(v) for k, v in d.items()}

    return _typed("json", parse, "json_sizes", lo=1, hi=max_bytes)


# ---------------------------------------------------------------------------- introspection

FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                argparse._VersionAction, argparse._CountAction, argparse._StoreConstAction,
                argparse._SubParsersAction)


def walk_options(parser: argparse.ArgumentParser, prog: str | None = None):
    """Yield (prog, action) for every option and positional of a parser and its subparsers,
    flags and the subcommand selector excluded."""
    prog = prog or parser.prog
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from walk_options(sub, f"{prog} {name}")
        elif not isinstance(a, FLAG_ACTIONS):
            yield prog, a


def unvalidated(parser: argparse.ArgumentParser) -> list[str]:
    """Options that take a value but have neither a typed validator nor `choices`."""
    bad = []
    for prog, a in walk_options(parser):
        if a.choices is None and getattr(a.type, "kind", None) is None:
            if a.nargs == argparse.REMAINDER or a.dest == "exo_args":
                continue  # passed through verbatim to another program
            bad.append(f"{prog} {'/'.join(a.option_strings) or a.dest}")
    return bad
