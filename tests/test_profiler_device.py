"""The device description and its two microbenchmarks, measured for real."""

import pytest

from profiler.device import backend, describe, peak_rss_bytes


@pytest.mark.slow
def test_describe_this_machine():
    d = describe("float32")
    assert d.backend == backend() and d.backend in ("cpu", "metal", "cuda", "gpu")
    assert d.name and d.host and d.mlx_version
    assert 0 < d.memory_usable_bytes <= d.memory_total_bytes
    assert d.memory_bandwidth_gbs > 0 and d.matmul_tflops > 0
    assert d.microbench["bandwidth"]["read_gbs"] > 0
    assert d.microbench["matmul"]["dtype"] == "float32"
    assert peak_rss_bytes() > 10 * 2**20


def _cgroup_tree(tmp_path, files: dict[str, str], proc: str):
    for rel, text in files.items():
        f = tmp_path / "fs" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    return str(tmp_path / "cgroup"), str(tmp_path / "fs")


def test_cpu_quota_is_read_from_cgroup_v1_and_v2_files(tmp_path):
    from profiler.device import cpu_quota_cores
    # v1: the smallest quota on the path (the parent's) is the one in force
    proc, root = _cgroup_tree(tmp_path / "v1", {
        "cpu/a/cpu.cfs_quota_us": "30000\n", "cpu/a/cpu.cfs_period_us": "100000\n",
        "cpu/a/b/cpu.cfs_quota_us": "-1\n", "cpu/a/b/cpu.cfs_period_us": "100000\n",
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
        "9:cpu:/a/b\n8:memory:/a/b\n")
    assert cpu_quota_cores(proc, root) == pytest.approx(0.3)
    proc, root = _cgroup_tree(tmp_path / "none", {
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "9:cpu:/\n")
    assert cpu_quota_cores(proc, root) is None
    # v2: "max" is no limit
    proc, root = _cgroup_tree(tmp_path / "v2", {"x/cpu.max": "50000 100000\n",
                                                "cpu.max": "max 100000\n"}, "0::/x\n")
    assert cpu_quota_cores(proc, root) == pytest.approx(0.5)
    assert cpu_quota_cores(str(tmp_path / "missing"), root) is None


def test_cpu_quota_of_a_real_cgroup(tmp_path):
    """As root with cgroup v1's cpu controller: a process put in a 0.5-core group reads 0.5."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    base = Path("/sys/fs/cgroup/cpu")
    if os.geteuid() != 0 or not (base / "cgroup.procs").exists():
        pytest.skip("needs root and cgroup v1's cpu controller at /sys/fs/cgroup/cpu")
    cg = base / f"mlxsplit-test-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "cpu.cfs_period_us").write_text("100000")
        (cg / "cpu.cfs_quota_us").write_text("50000")
        code = "from profiler.device import cpu_quota_cores; print(cpu_quota_cores())"
        out = subprocess.run(["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$0" -c "$1"',
                              sys.executable, code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert float(out.stdout) == pytest.approx(0.5)
    finally:
        cg.rmdir()
