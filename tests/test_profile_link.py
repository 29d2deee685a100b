"""profile-link: a real TCP server and client on loopback; the cluster file is updated in place."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from exo_bridge.profile_link import (activation_sizes, measure, serve_in_thread, write_link)
from profiler.errors import UserError


def test_measure_loopback_reports_every_size():
    port, stop = serve_in_thread()
    try:
        m = measure("127.0.0.1", port, activation_sizes(64, 4, 16), repeats=3, warmup=1)
    finally:
        stop.set()
    assert set(m.sizes) == {"ping", "token", "prompt"}
    assert m.sizes["token"]["bytes"] == 256 and m.sizes["prompt"]["bytes"] == 4096
    assert m.latency_ms > 0 and m.bandwidth_gbps > 0


def test_write_link_replaces_pair_atomically(tmp_path):
    cl = tmp_path / "cluster.json"
    cl.write_text(json.dumps({"model": "m", "nodes": [{"id": "a"}, {"id": "b"}],
                              "links": [{"from": "a", "to": "b", "latency_ms": 9,
                                         "bandwidth_gbps": 9},
                                        {"from": "b", "to": "a", "latency_ms": 7,
                                         "bandwidth_gbps": 7}]}))
    port, stop = serve_in_thread()
    try:
        m = measure("127.0.0.1", port, {"token": 1024}, repeats=2, warmup=1)
    finally:
        stop.set()
    write_link(cl, "a", "b", m)
    links = json.loads(cl.read_text())["links"]
    ab = [lk for lk in links if (lk["from"], lk["to"]) == ("a", "b")]
    assert len(ab) == 1 and ab[0]["latency_ms"] != 9 and ab[0]["measured"]["by"] == "profile-link"
    assert any((lk["from"], lk["to"]) == ("b", "a") for lk in links)  # other direction kept
    write_link(cl, "a", "b", m, both_ways=True)
    links = json.loads(cl.read_text())["links"]
    assert len(links) == 1 and links[0]["both_ways"] is True
    with pytest.raises(UserError, match="no node 'zz'"):
        write_link(cl, "a", "zz", m)


def test_cli_self_test_and_unreachable_server_is_one_line(tmp_path):
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.profile_link", "self-test",
                         "--hidden", "64", "--prompt-tokens", "8", "--repeats", "2", "--json"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["measurement"]["latency_ms"] > 0
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.profile_link", "measure",
                         "127.0.0.1:1", "--repeats", "1"], capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 2
    assert cp.stderr.startswith("error: nothing listens at 127.0.0.1:1 (connection refused)")
    assert cp.stderr.count("\n") == 1


def test_mlx_runtime_path_pingpong_on_loopback():
    """`profile-link mlx --local`: two mx.distributed ranks, the runner's send/select/recv path."""
    pytest.importorskip("mlx.core")
    from exo_bridge.profile_link import measure_mlx_local

    m = measure_mlx_local({"token": 256, "prompt": 4096}, repeats=3, gap_ms=1.0, timeout_s=90)
    assert set(m.sizes) == {"ping", "token", "prompt"}
    assert m.sizes["prompt"]["bytes"] == 4096
    assert m.latency_ms > 0 and "mx.distributed" in m.method


# ------------------------------------------------------------- misbehaving peers, one line each

import socket  # noqa: E402
import threading  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

from exo_bridge import profile_link as pl  # noqa: E402


@contextmanager
def tcp_peer(behave):
    """A real TCP server on loopback whose every connection is handled by behave(conn)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=_run, args=(behave, conn), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        srv.close()


def _run(behave, conn):
    with conn:
        try:
            behave(conn)
        except OSError:
            pass


def _read_hello(conn):
    need = pl._HDR.size + len(pl.HELLO)
    got = b""
    while len(got) < need:
        chunk = conn.recv(need - len(got))
        if not chunk:
            return False
        got += chunk
    return True


def _greet(conn):
    return _read_hello(conn) and conn.sendall(pl.ACK) is None


def _never_answers(conn):
    threading.Event().wait(5)


def _closes_mid_reply(conn):
    _read_hello(conn)
    conn.sendall(pl.ACK[:5])  # then closes


def _slow_forever(conn):
    _greet(conn)
    while conn.recv(1 << 16):  # answers every ping-pong, a little too late, forever
        threading.Event().wait(0.3)
        conn.sendall(b"\0")


def _wrong_types(conn):
    _greet(conn)
    conn.recv(1 << 16)
    conn.sendall(b"\x07")  # the reply is a zero byte; a wrong value is another protocol


def _closes_mid_body(conn):
    _greet(conn)
    conn.recv(64)  # the header and a bit of the first body, then gone (RST)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")


class _Http(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass


def _one_line(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("behave, expect", [
    (_never_answers, "did not answer the greeting within --timeout 1 s"),
    (_slow_forever, "did not finish the measurement within --timeout 1 s"),
    (_closes_mid_reply, "does not answer as a profile-link server"),
    (_wrong_types, "answered b'\\x07' where a zero byte belongs"),
    (_closes_mid_body, "closed the connection"),
])
def test_misbehaving_peer_is_one_line_within_the_timeout(capsys, behave, expect):
    with tcp_peer(behave) as port:
        rc = pl.main(["measure", f"127.0.0.1:{port}", "--hidden", "64", "--prompt-tokens",
                      "512", "--repeats", "3", "--timeout", "1"])
    assert expect in _one_line(capsys, rc)


def test_a_server_of_another_protocol_is_named(capsys):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        rc = pl.main(["measure", f"127.0.0.1:{httpd.server_port}", "--timeout", "5"])
    finally:
        httpd.shutdown()
    err = _one_line(capsys, rc)
    assert "speaks another protocol" in err and "DOCTYPE" in err  # its HTML error page


@pytest.mark.parametrize("server, expect", [
    ("127.0.0.1:0", "out of range"), ("127.0.0.1:65536", "out of range"),
    ("127.0.0.1:" + "9" * 400, "out of range"), ("127.0.0.1:http", "not a whole number"),
    ("127.0.0.1:", "empty port"), (":52900", "no host"), ("a b:1", "not a host name"),
    ("[::1:5", "not HOST:PORT"), ("127.0.0.1:-1", "out of range"),
])
def test_malformed_server_addresses(capsys, server, expect):
    rc = pl.main(["measure", server])
    err = _one_line(capsys, rc)
    assert "argument server" in err and expect in err


def test_refused_unknown_host_and_out_of_range_say_different_things(capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a closed port: refused, not "out of range"
    assert "connection refused" in _one_line(capsys, pl.main(["measure", f"127.0.0.1:{port}"]))
    err = _one_line(capsys, pl.main(["measure", "no-such-host.invalid:5"]))
    assert "cannot resolve host" in err


def test_serve_refuses_a_busy_port_and_survives_a_bad_client(capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        err = _one_line(capsys, pl.main(["serve", "--host", "127.0.0.1", "--port",
                                         str(busy.getsockname()[1])]))
    finally:
        busy.close()
    assert "already in use" in err and "--port" in err
    port, stop = serve_in_thread()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a profile-link client
            try:  # closed by the server (unread bytes make it a reset), no reply, no crash
                assert c.recv(100) == b""
            except ConnectionResetError:
                pass
        m = measure("127.0.0.1", port, {"token": 256}, repeats=2, warmup=1, timeout_s=10)
    finally:
        stop.set()
    assert m.latency_ms > 0
    assert "not a profile-link client" in capsys.readouterr().err


def test_mlx_rank_whose_peer_never_comes_is_bounded_by_timeout(tmp_path):
    """`profile-link mlx --hostfile F --rank 0` with no rank 1: MLX waits inside C++ for the
    ring; the command runs the rank as a child and stops it at --timeout, one line, exit 2."""
    from exo_bridge.runner.run import free_ports

    hf = tmp_path / "hostfile.json"
    hf.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.profile_link", "mlx", "--hostfile",
                         str(hf), "--rank", "0", "--timeout", "3"], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 2 and cp.stderr.count("\n") == 1, cp.stderr
    assert "rank 0 failed: did not finish within --timeout 3 s" in cp.stderr
    assert "full log: " in cp.stderr


def test_mlx_two_hosts_mode_reports_on_rank_0(tmp_path):
    """The two-host form (one command per rank, same hostfile), here both on loopback."""
    pytest.importorskip("mlx.core")
    from exo_bridge.runner.run import free_ports

    hf = tmp_path / "hostfile.json"
    hf.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
    cmd = [sys.executable, "-m", "exo_bridge.profile_link", "mlx", "--hostfile", str(hf),
           "--hidden", "64", "--prompt-tokens", "8", "--repeats", "2", "--gap-ms", "1",
           "--json", "--timeout", "90", "--rank"]
    r1 = subprocess.Popen(cmd + ["1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    r0 = subprocess.run(cmd + ["0"], capture_output=True, text=True, timeout=120)
    out1 = r1.communicate(timeout=60)
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr, out1[1])
    assert json.loads(r0.stdout)["measurement"]["sizes"]["prompt"]["bytes"] == 8 * 64 * 2


# --------------------------------------------------------------- collectives (tensor groups)

from exo_bridge import profile_collective as pc  # noqa: E402


def _cluster3(tmp_path, **extra):
    cl = tmp_path / "cluster.json"
    cl.write_text(json.dumps({"model": "m", "nodes": [{"id": "a"}, {"id": "b"}, {"id": "c"}],
                              "links": [{"from": "a", "to": "b", "latency_ms": 1,
                                         "bandwidth_gbps": 1}], **extra}))
    return cl


def test_collective_sizes_are_a_decode_step_and_a_prefill():
    assert pc.collective_sizes(4096, 2, 128) == [8192, 92680, 1048576]
    assert pc.collective_sizes(64, 4, 1) == [256]  # one token: one size


def test_alpha_beta_fit_recovers_an_affine_link():
    sizes = [1000, 10_000, 100_000]
    lat, bw = pc.fit_alpha_beta(sizes, [2e-4 + n / 5e8 for n in sizes])
    assert lat == pytest.approx(2e-4) and bw == pytest.approx(5e8)
    assert pc.fit_alpha_beta(sizes, [3e-4, 2e-4, 1e-4])[1] is None  # no growth: no bandwidth


def test_collective_on_three_loopback_ranks_writes_the_group_entry(tmp_path):
    """Three real mx.distributed ranks: both algorithms timed at every size; the entry (I3) goes
    into the cluster file beside everything already there."""
    pytest.importorskip("mlx.core")
    old = {"op": "all_sum", "sizes_bytes": [8], "latency_s": 1.0, "bandwidth_Bps": 1.0}
    cl = _cluster3(tmp_path, collectives=[
        {"nodes": ["c", "a", "b"], "seconds": [9.0], **old},  # same group: replaced
        {"nodes": ["a", "b"], "seconds": [7.0], **old}])  # another group: kept
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.profile_link", "collective", "--local",
                         "--nodes", "a,b,c", "--hidden", "64", "--dtype-bytes", "4",
                         "--prompt-tokens", "16", "--repeats", "3", "--gap-ms", "0",
                         "--busy-ms", "1", "--cluster", str(cl), "--json"],
                        capture_output=True, text=True,
                        timeout=180)
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cl.read_text())
    assert data["links"][0]["latency_ms"] == 1  # nothing already in the file lost
    by = {tuple(sorted(c["nodes"])): c for c in data["collectives"]}
    assert set(by) == {("a", "b", "c"), ("a", "b")} and by[("a", "b")]["seconds"] == [7.0]
    e = by[("a", "b", "c")]
    assert e["nodes"] == ["a", "b", "c"] and e["op"] == "all_sum" and e["backend"] == "ring"
    assert e["sizes_bytes"] == [256, 1024, 4096] and e["algorithm"] == "neighbour-chain"
    assert (e["repeats"], e["gap_ms"], e["busy_ms"]) == (3, 0.0, 1.0)  # how it was measured
    for d in (e, e["mlx_all_sum"]):
        assert len(d["seconds"]) == len(d["spread"]) == 3
        assert all(t > 0 for t in d["seconds"]) and d["latency_s"] >= 0
    assert e == json.loads(cp.stdout)["collective"]
    from graphsplit.cluster import _collectives  # what the planner reads back (hybplan's reader)

    got = _collectives(data["collectives"], {"a": {}, "b": {}, "c": {}}, "cluster")
    assert got[(("a", "b", "c"), "all_sum")].seconds == tuple(e["seconds"])


def test_write_collective_replaces_only_its_group_and_keeps_concurrent_writes(tmp_path):
    cl = _cluster3(tmp_path)
    res = {"k": 2, "sizes_bytes": [256, 4096], "repeats": 3,
           "all_sum": {"seconds": [1e-3, 2e-3], "spread": [0.1, 0.1]},
           "chain": {"seconds": [1e-3, 3e-3], "spread": [0.1, 0.1]}}
    groups = [["a", "b"], ["b", "c"], ["a", "c"], ["c", "a", "b"]]
    threads = [threading.Thread(target=pc.write_collective,
                                args=(cl, pc.entry_from(res, g, "ring"))) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = sorted(tuple(sorted(c["nodes"])) for c in json.loads(cl.read_text())["collectives"])
    assert got == [("a", "b"), ("a", "b", "c"), ("a", "c"), ("b", "c")]
    e = pc.entry_from(res, ["b", "a"], "ring")
    assert e["latency_s"] == pytest.approx(1e-3 - 256 * 2e-3 / 3840)
    assert e["bandwidth_Bps"] == pytest.approx(3840 / 2e-3)
    pc.write_collective(cl, e)  # the same set in another order replaces a,b
    assert len(json.loads(cl.read_text())["collectives"]) == 4
    flat = dict(res, chain={"seconds": [3e-3, 2e-3], "spread": [0.1, 0.1]})
    e = pc.entry_from(flat, ["a", "b"], "ring")  # no growth with size: a lower bound, said so
    assert e["bandwidth_Bps"] == pytest.approx(4096 / 2e-3) and "lower bound" in \
        e["bandwidth_note"]
    with pytest.raises(UserError, match="no node 'zz' \\(given by --nodes\\)"):
        pc.write_collective(cl, pc.entry_from(res, ["a", "zz"], "ring"))
    bad = _cluster3(tmp_path, collectives={"a": 1})
    with pytest.raises(UserError, match="collectives"):
        pc.write_collective(bad, e)
    assert json.loads(bad.read_text())["collectives"] == {"a": 1}  # refused, not rewritten


@pytest.mark.parametrize("argv, says", [
    (["--local", "--cluster", "{cl}"], "--cluster needs --nodes"),
    (["--local", "--nodes", "a,zz", "--cluster", "{cl}"], "no node 'zz' (given by --nodes)"),
    (["--local", "--nodes", "a,a"], "named twice"),
    (["--local", "--nodes", "a"], "at least 2 node ids"),
    (["--nodes", "a,b"], "needs --hostfile FILE and --rank N"),
    (["--local", "--nodes", "a,b", "--hidden", "1048576", "--prompt-tokens", "1024"],
     "lower --prompt-tokens"),
])
def test_collective_bad_input_is_one_line_before_measuring(tmp_path, argv, says):
    cl = _cluster3(tmp_path)
    before = cl.read_text()
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.profile_link", "collective",
                         *[a.replace("{cl}", str(cl)) for a in argv]],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and cp.stderr.count("\n") == 1, cp.stderr
    assert says in cp.stderr
    assert cl.read_text() == before


def test_collective_rank_whose_peers_never_come_is_bounded_by_timeout(tmp_path):
    from exo_bridge.runner.run import free_ports

    hf = tmp_path / "hostfile.json"
    hf.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(3)]))
    cp = subprocess.run([sys.executable, "-m", "exo_bridge.profile_link", "collective",
                         "--hostfile", str(hf), "--rank", "0", "--timeout", "3"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and cp.stderr.count("\n") == 1, cp.stderr
    # the line names the subcommand that failed (before: "profile-link mlx" for every one)
    assert "profile-link collective rank 0 failed: did not finish within --timeout 3 s" in \
        cp.stderr
