#!/usr/bin/env python
"""Experiment: does a CFS-quota'd process run a short burst faster after it has idled?

    sudo sh -c 'mkdir /sys/fs/cgroup/cpu/q && echo 4000 > /sys/fs/cgroup/cpu/q/cpu.cfs_period_us &&
      echo 1000 > /sys/fs/cgroup/cpu/q/cpu.cfs_quota_us && echo $$ > /sys/fs/cgroup/cpu/q/cgroup.procs &&
      exec python bench/exp_quota_refill.py'       # the testbed's 0.25-core node

A fixed ~3 ms-of-CPU MLX job (six 1024 x 1024 float32 matrix-vector products) is timed back
to back, then each run after a 10 ms sleep, as a tensor-parallel rank waits on its all-reduce
between half blocks. A slower CPU takes the same time either way; a CFS quota refills during
the sleep, so the burst after it runs at full speed until the period's quota is used.
Everything printed is measured (wall: perf_counter, cpu: process_time).
"""

import statistics as st
import time

import mlx.core as mx

a = mx.random.normal((1024, 1024))
x = mx.random.normal((1, 1024))
ws = [mx.random.normal((1024, 1024)) for _ in range(6)]
mx.eval(a, x, *ws)


def job():
    h = x
    for w in ws:
        h = mx.tanh(h @ w)
    mx.eval(h)


for _ in range(20):
    job()
c0 = time.process_time()
t0 = time.perf_counter()
for _ in range(50):
    job()
cpu = (time.process_time() - c0) / 50
cont = (time.perf_counter() - t0) / 50
waits = []
for _ in range(50):
    time.sleep(0.010)  # as a tensor-parallel rank waits on its all-reduce
    t = time.perf_counter()
    job()
    waits.append(time.perf_counter() - t)
print(f"cpu per job {cpu * 1e3:.2f} ms; back to back {cont * 1e3:.2f} ms/job; after a 10 ms "
      f"wait {st.median(waits) * 1e3:.2f} ms/job (median)")
