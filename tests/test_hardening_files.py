"""Paths, writes, modes and concurrent writers, with real files, real processes and real mounts.

* special files (FIFO, directory, character device, symlink loop) given as an input or an output
  of every command are refused at once in one line (one subprocess runs them all under a
  timeout, so a read that blocked on the FIFO would fail the test instead of hanging it);
* an output whose parent is missing, is a file, is on a read-only file system or on a full
  disk (a 64 KiB tmpfs, when this runs as root; a file-size limit otherwise): one line, exit 2,
  the old file unchanged, no temporary file left, nothing printed as "written";
* files are created with the umask (not 0600) and a replaced file keeps its mode;
* two processes updating one cluster file (profile-link's read-modify-write) lose nothing;
  a second profile-model of a table that is being profiled refuses in one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from costtables import make_table, write_cluster
from profiler.errors import UserError, guard
from profiler.files import atomic_write_json, locked, read_json

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")


@pytest.fixture
def cluster(tmp_path):
    t = {n: make_table(n, n_layers=4) for n in ("a", "b")}
    return write_cluster(tmp_path, t, links=[{"from": "a", "to": "b", "latency_ms": 0.2,
                                              "bandwidth_gbps": 40, "both_ways": True}])


def _split(argv) -> tuple[int, str, str]:
    from graphsplit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# -- special files: refused at once, never blocking --------------------------------------------

SPECIAL_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from pathlib import Path
    from graphsplit.cli import main as split
    from exo_bridge.cli import main as bridge
    from exo_bridge.profile_link import main as link
    from exo_bridge import formats
    from profiler.cli import main as profile
    from profiler.errors import guard

    d, cluster, cfg = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    specials = {"fifo": d / "fifo", "directory": d / "dir", "device": Path("/dev/zero"),
                "symlink loop": d / "loop"}
    out_specials = dict(specials, device=Path("/dev/null"))
    reader = lambda f: guard(lambda p: (f(p), 0)[1])
    cases = []
    for kind, p in specials.items():
        cases += [(kind, "split-model CLUSTER", split, [str(p)]),
                  (kind, "exo-bridge compare PLAN", bridge, ["compare", str(p)]),
                  (kind, "exo-bridge run PLAN", bridge, ["run", str(p)]),
                  (kind, "profile-link --cluster", link,
                   ["self-test", "--cluster", str(p), "--from", "a", "--to", "b"]),
                  (kind, "--node-map", reader(formats.read_node_map), str(p)),
                  (kind, "--hostfile", reader(formats.read_hostfile), str(p)),
                  (kind, "profile-model CONFIG", profile, [str(p), "--quiet"])]
    for kind, p in out_specials.items():
        cases += [(kind, "split-model --out", split, [cluster, "--out", str(p)]),
                  (kind, "profile-model --out", profile,
                   [cfg, "--out", str(p), "--quiet", "--no-microbench"])]
    res = []
    for kind, what, fn, arg in cases:
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = fn(arg)
        res.append({"kind": kind, "what": what, "rc": rc, "err": err.getvalue()})
    print(json.dumps(res))
""")


def test_special_files_are_refused_at_once_and_never_block(tmp_path, cluster):
    from profiler.tiny import tiny_config

    d = tmp_path / "sp"
    d.mkdir()
    os.mkfifo(d / "fifo")
    (d / "dir").mkdir()
    os.symlink(d / "loop", d / "loop")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config(n_layers=2)))
    p = subprocess.run([sys.executable, "-c", SPECIAL_SCRIPT, str(d), str(cluster), str(cfg)],
                       capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(res) == 4 * 7 + 4 * 2
    words = {"fifo": "FIFO", "directory": "directory", "device": "device",
             "symlink loop": "symlink loop"}
    for r in res:
        line = _one_line(r["err"])
        assert r["rc"] == 2, r
        assert words[r["kind"]] in line, r
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)  # the FIFO was not replaced by a file
    assert not list(tmp_path.rglob("*.tmp"))


# -- outputs that cannot be written ---------------------------------------------------------------

def test_output_parent_missing_or_a_file(tmp_path, cluster):
    rc, out, err = _split([cluster, "--out", tmp_path / "no" / "such" / "plan.json"])
    assert rc == 2 and "does not exist" in _one_line(err) and "mkdir -p" in err
    (tmp_path / "afile").write_text("x")
    rc, out, err = _split([cluster, "--out", tmp_path / "afile" / "plan.json"])
    assert rc == 2 and "is not a directory" in _one_line(err)
    assert "written" not in out and not (tmp_path / "no").exists()


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode()[:100]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_file_system(tmp_path, cluster):
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        rc, out, err = _split([cluster, "--out", ro / "plan.json"])
        assert rc == 2 and "read-only file system" in _one_line(err)
        assert "cannot read" not in err and "written" not in out


def test_full_disk_keeps_the_old_file(tmp_path, cluster):
    with _tmpfs(tmp_path / "small", "size=64k") as fs:
        plan = fs / "plan.json"
        rc, _, err = _split([cluster, "--out", plan, "--runtime", "exo-legacy"])
        assert rc == 0, err
        old = plan.read_bytes()
        filler = fs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the disk to the last byte
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
        os.close(fd)
        rc, out, err = _split([cluster, "--out", plan, "--simulate"])
        line = _one_line(err)
        assert rc == 2 and "writing failed: no space left on the device" in line
        assert "was not changed" in line and "plan written" not in out
        assert plan.read_bytes() == old
        assert sorted(p.name for p in fs.iterdir()) == [".plan.json.lock", "filler",
                                                        "plan.json"]


def test_file_size_limit_keeps_the_old_file(tmp_path, cluster):
    """The same guarantee without root: a write cut short by RLIMIT_FSIZE (EFBIG)."""
    plan = tmp_path / "plan.json"
    assert _split([cluster, "--out", plan])[0] == 0
    old = plan.read_bytes()
    code = ("import resource, sys; from graphsplit.cli import main; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)); "
            f"sys.exit(main([{str(cluster)!r}, '--out', {str(plan)!r}, '--simulate']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=ENV)
    line = _one_line(p.stderr)
    assert p.returncode == 2 and "writing failed" in line and "file size limit" in line
    assert "plan written" not in p.stdout
    assert plan.read_bytes() == old and not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_is_not_called_a_read():
    def main():
        raise PermissionError(13, "Permission denied", "/some/out.json")

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert guard(main)() == 2
    line = _one_line(err.getvalue())
    assert "/some/out.json: permission denied" in line and "read" not in line


# -- modes ---------------------------------------------------------------------------------------

def test_new_files_follow_the_umask_and_a_replaced_file_keeps_its_mode(tmp_path):
    old = os.umask(0o022)
    try:
        a = atomic_write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE(os.stat(a).st_mode) == 0o644
        os.umask(0o077)
        b = atomic_write_json(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE(os.stat(b).st_mode) == 0o600
        os.chmod(a, 0o640)
        atomic_write_json(a, {"x": 2})
        assert stat.S_IMODE(os.stat(a).st_mode) == 0o640 and json.loads(a.read_text()) == {"x": 2}
    finally:
        os.umask(old)


def test_a_symlinked_output_updates_its_target(tmp_path):
    target = tmp_path / "real.json"
    atomic_write_json(target, {"v": 1})
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_json(link, {"v": 2})
    assert link.is_symlink() and json.loads(target.read_text()) == {"v": 2}


# -- strict JSON -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expect", [
    ('{"a": 1, "a": 2}', "a: the key 'a' appears twice"),
    ('{"a": [1, NaN]}', "a[1]: NaN is not a number JSON allows"),
    ('{"a": {"b": -Infinity}}', "a.b: -Infinity is not a number JSON allows"),
    ('{"a": 1e999}', "a: 1e999 overflows a 64-bit float"),
    ('{"a": ' + "9" * 5000 + "}", "a: an integer of 5000 digits"),
    ("[" * 100000 + "]" * 100000, "not usable JSON"),
    ("\xff\xfe{}", "not valid JSON"),
])
def test_json_that_python_would_accept_is_refused_with_its_field(tmp_path, text, expect):
    f = tmp_path / "f.json"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        read_json(f, f"plan {f}")
    assert expect in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


# -- concurrent writers ----------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from exo_bridge.profile_link import LinkMeasurement, write_link
    cluster, src, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.001)
    for j in range(n):
        m = LinkMeasurement(host="x", latency_ms=0.1 + j, bandwidth_gbps=1.0 + j)
        write_link(cluster, src, f"n{j + 2}", m)
""")


def test_two_processes_updating_one_cluster_file_lose_nothing(tmp_path):
    n = 30
    cl = tmp_path / "cluster.json"
    cl.write_text(json.dumps({"model": "m", "nodes": [{"id": f"n{i}"} for i in range(n + 2)]}))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(cl), src, str(n), str(go)],
                              env=ENV, stderr=subprocess.PIPE, text=True)
             for src in ("n0", "n1")]
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    links = {(lk["from"], lk["to"]) for lk in json.loads(cl.read_text())["links"]}
    assert links == {(s, f"n{j + 2}") for s in ("n0", "n1") for j in range(n)}


HOLDER = textwrap.dedent("""
    import sys, time
    from profiler.costtable import lock_table
    with lock_table(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()
""")


def test_a_second_profile_of_the_same_table_refuses(tmp_path):
    from profiler.cli import main as profile
    from profiler.tiny import tiny_config

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config(n_layers=2)))
    out = tmp_path / "t.json"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = profile([str(cfg), "--out", str(out), "--quiet", "--no-microbench"])
        line = _one_line(err.getvalue())
        assert rc == 2 and f"another run (pid {holder.pid}" in line and "is writing it" in line
        assert not out.exists()
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=60)
    with locked(out, "t", wait_s=0):  # released with the process
        pass


def test_plot_output_is_checked_and_written_atomically(tmp_path, cluster):
    os.mkfifo(tmp_path / "fifo.png")
    rc, out, err = _split([cluster, "--out", tmp_path / "plan.json", "--plot",
                           tmp_path / "fifo.png"])
    assert rc == 2 and "--plot" in _one_line(err) and "FIFO" in err
    assert not (tmp_path / "plan.json").exists()  # refused before the plan was written
    rc, out, err = _split([cluster, "--plot", tmp_path / "p.xyz"])
    assert rc == 2 and ".xyz is not an image format" in _one_line(err)
    rc, out, err = _split([cluster, "--plot", tmp_path / "p.png"])
    assert rc == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert stat.S_IMODE(os.stat(tmp_path / "p.png").st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


LOOP_WRITER = textwrap.dedent("""
    import sys
    from profiler.files import atomic_write_json
    i = 0
    while True:
        atomic_write_json(sys.argv[1], {"i": i, "pad": ["x" * 100] * 5000})
        i += 1
        if i == 3:
            print("writing", flush=True)
""")


def test_kill_9_mid_write_leaves_a_whole_file_and_no_litter(tmp_path):
    """Readers during the writes and after kill -9 always see a whole file (old or new); the
    next write removes the killed writer's temporary file."""
    target = tmp_path / "plan.json"
    p = subprocess.Popen([sys.executable, "-c", LOOP_WRITER, str(target)], env=ENV,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        seen = set()
        while len(seen) < 3:  # until the reads have overlapped several writes
            seen.add(json.loads(target.read_text())["i"])  # never half a file
        p.kill()
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    json.loads(target.read_text())
    if not list(tmp_path.glob(".plan.json.*.tmp")):  # killed between two writes: make litter
        (tmp_path / f".plan.json.{p.pid}.1.tmp").write_text('{"half": ')
    atomic_write_json(target, {"i": -1})
    assert json.loads(target.read_text()) == {"i": -1}
    assert not list(tmp_path.glob(".plan.json.*.tmp"))


CLUSTER_HOLDER = textwrap.dedent("""
    import sys
    from profiler.files import locked
    with locked(sys.argv[1], "cluster"):
        print("held", flush=True)
        sys.stdin.readline()
""")


def test_a_second_cluster_writer_waits_then_refuses_in_one_line(tmp_path):
    import threading

    from exo_bridge.profile_link import LinkMeasurement, main as link_main, write_link

    cl = tmp_path / "cluster.json"
    cl.write_text(json.dumps({"model": "m", "nodes": [{"id": "a"}, {"id": "b"}]}))
    m = LinkMeasurement(host="x", latency_ms=0.5, bandwidth_gbps=2.0)
    holder = subprocess.Popen([sys.executable, "-c", CLUSTER_HOLDER, str(cl)], env=ENV,
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as e:
            write_link(cl, "a", "b", m, wait_s=0.2)
        assert f"another run (pid {holder.pid}" in str(e.value) and "waited 0.2 s" in str(e.value)
        done = []
        t = threading.Thread(target=lambda: done.append(write_link(cl, "a", "b", m)))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not done  # waiting: the holder still has the lock
        holder.stdin.write("\n")
        holder.stdin.flush()
        t.join(60)
        assert done and json.loads(cl.read_text())["links"][0]["latency_ms"] == 0.5
    finally:
        if holder.poll() is None:
            holder.stdin.write("\n")
            holder.stdin.flush()
        holder.wait(timeout=60)
    # a bad cluster file is refused before anything is measured (no server at port 9)
    cl.write_text(json.dumps({"model": "m", "nodes": [{"id": "a", "memory_bytes": -5}]}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = link_main(["measure", "127.0.0.1:9", "--cluster", str(cl), "--from", "a",
                        "--to", "b"])
    assert rc == 2 and "nodes[0].memory_bytes: must be a number > 0, got -5" in _one_line(
        err.getvalue())
