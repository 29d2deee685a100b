"""What machine the profile was measured on: name, memory, MLX backend and two microbenchmarks.

* name: the GPU name from `mx.device_info()` on Metal / CUDA, else the CPU model from
  /proc/cpuinfo (Linux) or `sysctl machdep.cpu.brand_string` (macOS);
* memory_total_bytes: physical RAM from the OS;
* memory_usable_bytes: `mx.get_memory_limit()` (MLX's own limit: 0.8 x RAM on the Linux CPU
  build, the recommended working set on Metal), capped at the total;
* backend: "metal" / "cuda" when MLX's default device is the GPU and that backend is available,
  else "cpu";
* memory_bandwidth_gbs: measured, the better of a read (sum) and a copy (read + write) over an
  array much larger than the caches;
* matmul_tflops: measured, a square matmul in the profiled dtype.
"""

from __future__ import annotations

import os
from pathlib import Path
import platform
import resource
import socket
import subprocess
import sys

import mlx.core as mx

from profiler.build import mx_dtype
from profiler.costtable import DeviceInfo
from profiler.measure import time_fn


def backend() -> str:
    dev = mx.default_device()
    if dev.type == mx.gpu:
        cuda = getattr(mx, "cuda", None)
        if cuda is not None and getattr(cuda, "is_available", lambda: False)():
            return "cuda"
        metal = getattr(mx, "metal", None)
        if metal is not None and getattr(metal, "is_available", lambda: False)():
            return "metal"
        return "gpu"
    return "cpu"


def _device_info() -> dict:
    try:
        return dict(mx.device_info())
    except Exception:  # older MLX or no device info on this backend
        return {}


def cpu_name() -> str:
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(kind: str) -> str:
    info = _device_info()
    if kind != "cpu":
        for key in ("device_name", "name"):
            if info.get(key):
                return str(info[key])
    name = cpu_name()
    n = os.cpu_count() or 0
    return f"{name} ({n} cores)" if n else name


def memory_total() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return int(_device_info().get("memory_size", 0))


def memory_usable(total: int) -> int:
    try:
        limit = int(mx.get_memory_limit())
    except Exception:
        limit = 0
    if limit <= 0:
        limit = int(0.8 * total)
    return min(limit, total) if total else limit


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def load_note() -> str | None:
    """A warning when other processes compete for the CPU (1-minute load average at or above
    the core count minus one), else None. Timings taken under load are noisy and too slow."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    cores = os.cpu_count() or 1
    if load >= max(cores - 1, 1) + 0.5:
        return (f"note: load average {load:.1f} on {cores} cores: other processes compete for "
                "the CPU, so these timings are noisy and pessimistic")
    return None


def cpu_quota_cores(proc_cgroup: str = "/proc/self/cgroup",
                    root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota this process runs under, in cores (cgroup CFS bandwidth), or None.

    cgroup v1: cpu.cfs_quota_us / cpu.cfs_period_us of this process's cpu cgroup and its
    ancestors (-1: none); cgroup v2: cpu.max ("max PERIOD": none). The smallest over the path
    is the one in force. Linux only; anything unreadable counts as no quota."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.strip("/").split("/") if path.strip("/") else []
        if "cpu" in controllers.split(","):
            bases = [Path(root) / "cpu", Path(root) / "cpu,cpuacct", Path(root) / "cpuacct,cpu"]
            for base in bases:
                for k in range(len(rel), -1, -1):
                    d = base.joinpath(*rel[:k])
                    try:
                        q = int((d / "cpu.cfs_quota_us").read_text())
                        per = int((d / "cpu.cfs_period_us").read_text())
                    except (OSError, ValueError):
                        continue
                    if q > 0 and per > 0:
                        limits.append(q / per)
        elif controllers == "":
            for k in range(len(rel), -1, -1):
                try:
                    quota, period = (Path(root).joinpath(*rel[:k]) / "cpu.max").read_text().split()
                except (OSError, ValueError):
                    continue
                if quota != "max":
                    limits.append(int(quota) / int(period))
    return min(limits) if limits else None


# -- microbenchmarks ----------------------------------------------------------------------------

def bandwidth_gbs(kind: str, repeats: int = 5) -> dict:
    """Memory bandwidth in GB/s (1e9 bytes/s), measured on an array far larger than caches."""
    n_bytes = (256 if kind == "cpu" else 1024) * 2**20
    a = mx.random.uniform(shape=(n_bytes // 4,), dtype=mx.float32)
    mx.eval(a)
    read = time_fn(lambda: mx.eval(mx.sum(a)), warmup=1, repeats=repeats, max_rounds=2)
    copy = time_fn(lambda: mx.eval(a * 1.0), warmup=1, repeats=repeats, max_rounds=2)
    read_gbs = n_bytes / read.median_s / 1e9
    copy_gbs = 2 * n_bytes / copy.median_s / 1e9
    return {"bandwidth_gbs": max(read_gbs, copy_gbs), "read_gbs": round(read_gbs, 3),
            "copy_gbs": round(copy_gbs, 3), "array_bytes": n_bytes,
            "how": "float32 array: sum (bytes read) and a*1 (bytes read+written), median of "
                   f"{repeats}; the better of the two"}


def matmul_tflops(kind: str, dtype: str, repeats: int = 3) -> dict:
    """Matmul throughput in TFLOPS (2 n^3 / time) in the profiled activation dtype."""
    n = 1024 if kind == "cpu" else 4096
    dt = mx_dtype(dtype)
    a = mx.random.normal((n, n)).astype(dt)
    b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a, b)
    t = time_fn(lambda: mx.eval(a @ b), warmup=1, repeats=repeats, max_rounds=2)
    return {"matmul_tflops": 2 * n**3 / t.median_s / 1e12, "n": n, "dtype": dtype,
            "seconds": t.median_s,
            "how": f"{n}x{n} @ {n}x{n} in {dtype}, 2n^3 flops / median of {repeats}"}


def describe(dtype: str, microbench: bool = True) -> DeviceInfo:
    """Describe this machine and run both microbenchmarks (a few seconds)."""
    kind = backend()
    total = memory_total()
    bw = bandwidth_gbs(kind) if microbench else {"bandwidth_gbs": 0.0}
    mm = matmul_tflops(kind, dtype) if microbench else {"matmul_tflops": 0.0}
    mx.clear_cache()  # the benchmark arrays are gone: give their memory back
    return DeviceInfo(
        host=socket.gethostname().split(".")[0] or "localhost",
        name=device_name(kind),
        backend=kind,
        mlx_version=mx.__version__,
        platform=f"{platform.system()}-{platform.machine()}",
        memory_total_bytes=total,
        memory_usable_bytes=memory_usable(total),
        memory_bandwidth_gbs=round(float(bw["bandwidth_gbs"]), 3),
        matmul_tflops=round(float(mm["matmul_tflops"]), 6),
        microbench={"bandwidth": bw, "matmul": mm, "cpu_count": os.cpu_count(),
                    "measured": bool(microbench)},
    )
