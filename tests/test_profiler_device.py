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
