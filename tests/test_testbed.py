"""The emulated cluster: namespaces, veths, the link relay and CPU quotas are created and removed.

Needs root, `ip netns` and the cgroup v1 cpu controller; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from exo_bridge.testbed.bed import Testbed
from exo_bridge.testbed.spec import LinkSpec, NodeSpec, TestbedSpec, parse_link, parse_nodes
from exo_bridge.testbed.system import available, status

WHY = available()
needs_root = pytest.mark.skipif(WHY is not None, reason=f"testbed unavailable: {WHY}")
PREFIX = f"xbtest{os.getpid() % 1000}"


def test_parse_cli_specs():
    assert parse_nodes("a:1,b:0.25") == [NodeSpec("a", 1.0), NodeSpec("b", 0.25)]
    lk = parse_link("a-b:2ms:1gbit")
    assert (lk.src, lk.dst, lk.latency_ms, lk.rate_mbit, lk.both_ways) == ("a", "b", 2, 1000, True)
    assert parse_link("a>b:500us:10mbit").both_ways is False


def _spec():
    return TestbedSpec([NodeSpec("a", 1.0), NodeSpec("b", 0.5)],
                       [LinkSpec("a", "b", 3.0, 200.0)], prefix=PREFIX)


@needs_root
@pytest.mark.root
def test_up_measure_down():
    with Testbed(_spec()) as tb:
        st = status(PREFIX)
        assert set(st["namespaces"]) == {f"{PREFIX}-a", f"{PREFIX}-b", f"{PREFIX}-hub"}
        assert st["cgroups"][f"{PREFIX}-b"]["cpu"] == pytest.approx(0.5)
        m = tb.measure_link("a", "b", hidden=64, dtype_bytes=4, prompt_tokens=16, repeats=3)
        assert m["latency_ms"] >= 3.0  # the emulated delay is really there
        # a program in node b's cgroup and namespace sees b's address
        out = subprocess.run(tb.wrapper("b") + ["ip", "-br", "addr"], capture_output=True,
                             text=True, check=True).stdout
        assert "10.77.0.2" in out
    st = status(PREFIX)
    assert st == {"namespaces": {}, "cgroups": {}}


@needs_root
@pytest.mark.root
def test_failure_inside_removes_everything():
    with pytest.raises(RuntimeError):
        with Testbed(_spec()):
            raise RuntimeError("boom")
    assert status(PREFIX) == {"namespaces": {}, "cgroups": {}}


@needs_root
@pytest.mark.root
def test_ctrl_c_removes_everything(tmp_path):
    """`testbed up` in a child; SIGINT it; nothing with the prefix is left."""
    p = subprocess.Popen([sys.executable, "-m", "exo_bridge.testbed", "up", "--nodes", "a:1,b:0.5",
                          "--link", "a-b:1ms:100mbit", "--prefix", PREFIX],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if "testbed up" in line:
                break
        assert status(PREFIX)["namespaces"], "testbed did not come up"
        p.send_signal(2)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert status(PREFIX) == {"namespaces": {}, "cgroups": {}}


@needs_root
@pytest.mark.root
def test_down_command_cleans_leftovers():
    t = Testbed(_spec())
    t.up()  # no context manager: simulates a crash that left things behind
    try:
        cp = subprocess.run([sys.executable, "-m", "exo_bridge.testbed", "down", "--prefix",
                             PREFIX], capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        assert "netns" in cp.stdout
    finally:
        t.down()
    assert status(PREFIX) == {"namespaces": {}, "cgroups": {}}
