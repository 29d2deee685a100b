"""Reading and writing the user's files safely: the one place every command goes through.

* `read_text` / `read_json`: an input path that is a directory, a FIFO, a device, a socket or a
  symlink loop is refused at once (stat first, then open with O_NONBLOCK and check the open file
  again, so nothing ever blocks on a pipe). JSON is parsed strictly: NaN, Infinity, numbers that
  overflow a float, integers longer than 19 digits and duplicate keys are refused with the path
  of the field (JSON allows none of them for a real value; Python's parser would accept them).
* `check_output` / `atomic_write_json`: the output's parent must exist and be a writable
  directory, the output itself a regular file (or absent). The new content goes to a temporary
  file beside it, created like any other file (mode 0666 minus the umask; a replaced file keeps
  its mode), is fsync'ed and renamed over the target: a reader, a crash or a full disk leaves the
  old file or the new one, never half of one. A failed write says it was a write, and that the
  old file is unchanged. Temporary files of a writer killed mid-write (kill -9) are removed by
  the next write of the same file.
* `locked(path)`: an advisory lock (`fcntl.flock`) on a sidecar ``.<name>.lock`` beside a file,
  for read-modify-write (a cluster file updated by `profile-link`: wait up to `wait_s`) and for
  one writer per file (a second `profile-model` of the same table refuses at once, naming the
  process that holds it). The lock file is left in place (removing it would race a waiter);
  the lock itself goes with the process, so a killed run never leaves a stale lock.

Every problem is a `UserError` whose one line names the file, says what happened and how to fix
it. Plain Python, no MLX.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from profiler.errors import UserError

MAX_INPUT_BYTES = 256 << 20  # far beyond any cost table, plan or cluster file
_DIGITS = 19  # an integer longer than this cannot be a byte count or a layer index


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _os_problem(e: OSError) -> str:
    """An OSError in words, without the errno number."""
    return {errno.ELOOP: "is a symlink loop (or too many levels of symlinks)",
            errno.ENOTDIR: "has a path component that is not a directory",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.ENAMETOOLONG: "the name is too long",
            errno.ENOENT: "no such file"}.get(e.errno, (e.strerror or str(e)).lower())


def _stat(path: Path, what: str, writing: bool = False) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        verb = "cannot write it: " if writing else ""
        raise UserError(f"{what}: {verb}{_os_problem(e)}; check the path") from None


# -- reading --------------------------------------------------------------------------------

def read_text(path: str | os.PathLike, what: str, missing: str = "",
              error: type[UserError] = UserError) -> str:
    """The text of a regular file; anything else (missing, a directory, a FIFO, a device, a
    socket, a symlink loop, unreadable, not UTF-8, absurdly large) raises `error` at once."""
    p = Path(path)

    def bad(problem: str, hint: str = "") -> UserError:
        return error(f"{what}: {problem}" + (f"; {hint}" if hint else ""))

    st = _stat(p, what)
    if st is None:
        raise bad("no such file", missing or "check the path")
    kind = _kind(st.st_mode)
    if kind:
        raise bad(f"is {kind}, expected a regular file", "give the path of the file itself")
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise bad(f"cannot open it for reading: {_os_problem(e)}",
                  "check the file's permissions") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        kind = _kind(st.st_mode)  # replaced between the stat and the open
        if kind:
            raise bad(f"is {kind}, expected a regular file")
        if st.st_size > MAX_INPUT_BYTES:
            raise bad(f"is {st.st_size / 2**20:.0f} MiB, far larger than any file this tool "
                      "writes", "check the path")
        try:
            raw = f.read(MAX_INPUT_BYTES + 1)
        except OSError as e:
            raise bad(f"reading it failed: {_os_problem(e)}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("not a text file (not UTF-8)", "give the JSON file this tool wrote") from None


class _Bad:
    """A JSON token that Python parses but no real value may be: kept to report its field."""

    def __init__(self, token: str, why: str):
        self.token, self.why = token, why


def _parse_constant(s: str) -> _Bad:
    return _Bad(s, f"{s} is not a number JSON allows")


def _parse_float(s: str) -> Any:
    v = float(s)
    return v if math.isfinite(v) else _Bad(s[:20] + ("..." if len(s) > 20 else ""),
                                           f"{s[:20]} overflows a 64-bit float")


def _parse_int(s: str) -> Any:
    digits = len(s.lstrip("-"))
    return int(s) if digits <= _DIGITS else _Bad(s, f"an integer of {digits} digits is far too "
                                                    "large for any field")


class _Dup:
    def __init__(self, key: str):
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            out[k] = _Dup(k)
        else:
            out[k] = v
    return out


def _first_bad(v: Any, path: str = "") -> tuple[str, str] | None:
    """(field path, problem) of the first token refused by the strict parse, else None."""
    if isinstance(v, _Bad):
        return path or "top level", v.why
    if isinstance(v, _Dup):
        return path, f"the key {v.key!r} appears twice; keep one"
    if isinstance(v, dict):
        for k, x in v.items():
            r = _first_bad(x, f"{path}.{k}" if path else k)
            if r:
                return r
    elif isinstance(v, list):
        for i, x in enumerate(v):
            r = _first_bad(x, f"{path}[{i}]")
            if r:
                return r
    return None


def loads(text: str) -> Any:
    """json.loads that keeps NaN / Infinity / overflowing floats / over-long integers /
    duplicate keys as markers; `read_json` reports them with their field."""
    return json.loads(text, parse_constant=_parse_constant, parse_float=_parse_float,
                      parse_int=_parse_int, object_pairs_hook=_pairs)


def read_json(path: str | os.PathLike, what: str, missing: str = "", invalid: str = "",
              error: type[UserError] = UserError) -> Any:
    """Parse a JSON file the user named; any problem raises `error` as one line
    "<what>: <problem>[; <hint>]" (see `read_text`; `invalid` is the hint for bad JSON)."""
    text = read_text(path, what, missing=missing, error=error)
    try:
        data = loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})"
                    + (f"; {invalid}" if invalid else "")) from None
    except (ValueError, RecursionError) as e:
        raise error(f"{what}: not usable JSON ({str(e)[:80]})"
                    + (f"; {invalid}" if invalid else "")) from None
    bad = _first_bad(data)
    if bad:
        raise error(f"{what}: {bad[0]}: {bad[1]}; write a finite number"
                    if "appears twice" not in bad[1] else f"{what}: {bad[0]}: {bad[1]}")
    return data


# -- writing --------------------------------------------------------------------------------

def check_output(path: str | os.PathLike, what: str, make_parents: bool = False) -> Path:
    """Refuse at once an output that cannot be written: the path is a directory, a FIFO, a
    device or a symlink loop; its parent is missing (unless `make_parents`), not a directory
    or not writable. Returns the path to write (a symlink's target, so the link stays)."""
    p = Path(path)
    st = _stat(p, what, writing=True)
    if st is not None:
        kind = _kind(st.st_mode)
        if kind:
            raise UserError(f"{what}: is {kind}; give the path of a regular file to write")
        p = Path(os.path.realpath(p))
    parent = p.parent if str(p.parent) else Path(".")
    pst = _stat(parent, f"{what}: directory {parent}", writing=True)
    if pst is None and make_parents:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{what}: cannot create the directory {parent}: "
                            f"{_os_problem(e)}; create it yourself or choose another path") \
                from None
        pst = _stat(parent, f"{what}: directory {parent}")
    if pst is None:
        raise UserError(f"{what}: the directory {parent} does not exist; create it "
                        f"(mkdir -p {parent}) or choose another path")
    if not stat.S_ISDIR(pst.st_mode):
        raise UserError(f"{what}: {parent} is not a directory, so nothing can be written "
                        "inside it; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        ro = _read_only_fs(parent)
        raise UserError(f"{what}: cannot write in {parent}: "
                        f"{'read-only file system' if ro else 'permission denied'}; "
                        "choose a writable directory")
    return p


def _read_only_fs(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _write_problem(e: OSError) -> str:
    return {errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "the file is larger than this process may write (file size limit)",
            errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EIO: "input/output error"}.get(e.errno, (e.strerror or str(e)).lower())


def atomic_write_text(path: str | os.PathLike, text: str, what: str | None = None,
                      make_parents: bool = False) -> Path:
    """`atomic_write_bytes` of `text` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), what, make_parents=make_parents)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str | None = None,
                       make_parents: bool = False) -> Path:
    """Write `data` to `path` so a reader sees the old file or the new one, never half of one.

    The temporary file is created with mode 0666 minus the umask (like any tool's output), or
    with the mode of the file it replaces; it is fsync'ed, renamed over the target and the
    directory fsync'ed. Any failure removes the temporary file, leaves the old file as it was
    and raises one UserError line saying the WRITE failed and why."""
    what = what or str(path)
    target = check_output(path, what, make_parents=make_parents)
    old = _stat(target, what)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{time.monotonic_ns() % 10**9}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o666)
    except OSError as e:
        raise UserError(f"{what}: writing failed: {_write_problem(e)}; {target} was not "
                        "changed") from None
    try:
        try:
            if old is not None:
                os.fchmod(fd, stat.S_IMODE(old.st_mode))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        hint = "free some space and run again" if e.errno in (errno.ENOSPC, errno.EDQUOT) \
            else "check the directory"
        state = "was not changed" if old is not None else "was not created"
        raise UserError(f"{what}: writing failed: {_write_problem(e)}; {target} {state}; "
                        f"{hint}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    _remove_stale_temps(target)
    return target


def _remove_stale_temps(target: Path) -> None:
    """Temporary files of this target left by a writer that was killed (kill -9) mid-write:
    named ``.<name>.<pid>.<n>.tmp``; removed when that pid no longer runs."""
    import glob

    prefix = f".{target.name}."
    for t in target.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = t.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                t.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def dumps(data: Any) -> str:
    """The JSON text every writer uses (finite numbers only)."""
    try:
        return json.dumps(data, indent=1, allow_nan=False) + "\n"
    except ValueError as e:  # a NaN or Infinity reached a writer: a bug, say where
        raise ValueError(f"refusing to write a non-finite number: {e}") from None


def atomic_write_json(path: str | os.PathLike, data: Any, what: str | None = None,
                      make_parents: bool = False) -> Path:
    """`atomic_write_text` of `data` as JSON (indent 1, NaN / Infinity refused)."""
    return atomic_write_text(path, dumps(data), what, make_parents=make_parents)


# -- locking --------------------------------------------------------------------------------

def lock_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.parent / f".{p.name}.lock"


@contextlib.contextmanager
def locked(path: str | os.PathLike, what: str, wait_s: float = 60.0,
           make_parents: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (a sidecar ``.<name>.lock``) for the block.

    wait_s > 0: wait for another holder up to that long, then refuse; wait_s = 0: refuse at once.
    The refusal is one UserError line naming the holder's pid and command. The lock is
    released when the block ends or the process dies (flock), never left stale."""
    import fcntl

    target = check_output(path, what, make_parents=make_parents)
    lp = lock_path(target)
    try:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise UserError(f"{what}: cannot create the lock file {lp}: {_write_problem(e)}; "
                        "choose a writable directory") from None
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
                    raise UserError(f"{what}: another run{holder} is writing it{waited}; "
                                    "wait for it to finish, or write another file") from None
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {' '.join(sys.argv)[:200]}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        line = os.pread(fd, 300, 0).decode("utf-8", "replace").splitlines()[0].strip()
        pid, _, cmd = line.partition(" ")
        if pid.isdigit():
            return f" (pid {pid}: {cmd[:80]})" if cmd else f" (pid {pid})"
    return ""
