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
    assert cp.stderr.startswith("error: cannot reach") and cp.stderr.count("\n") == 1


def test_mlx_runtime_path_pingpong_on_loopback():
    """`profile-link mlx --local`: two mx.distributed ranks, the runner's send/select/recv path."""
    pytest.importorskip("mlx.core")
    from exo_bridge.profile_link import measure_mlx_local

    m = measure_mlx_local({"token": 256, "prompt": 4096}, repeats=3, gap_ms=1.0, timeout_s=90)
    assert set(m.sizes) == {"ping", "token", "prompt"}
    assert m.sizes["prompt"]["bytes"] == 4096
    assert m.latency_ms > 0 and "mx.distributed" in m.method
