"""Timing helpers shared by the benchmark scripts."""

import os
import platform
import statistics
import time

import jax


def time_fn(fn, args, repeats, min_time):
    """Median seconds per call of a jitted `fn(*args)` after a warm-up call."""
    jax.block_until_ready(fn(*args))
    number, elapsed = 1, 0.0
    while True:  # calibrate the number of calls per measurement
        t0 = time.perf_counter()
        for _ in range(number):
            out = fn(*args)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or number >= 1 << 16:
            break
        number *= 2
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)


def machine_line():
    dev = jax.devices()[0]
    return (
        f"JAX {jax.__version__}, backend {jax.default_backend()} ({dev.device_kind}), "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    )
