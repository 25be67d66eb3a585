"""Time the Pallas kernels of compression/kernels against XLA bf16 and the reference paths.

    python benchmarks/bench_kernels.py                       # GPU: Llama shapes; CPU: small
    python benchmarks/bench_kernels.py --check --json $OUT/kernels.json   # + correctness table
    python benchmarks/bench_kernels.py --interpret --check   # CPU: run the kernels interpreted

Per (K, N) weight and token count M, every method is timed in the same run:

* bf16: XLA's x @ W on the dense bf16 weights (the baseline of the ratios);
* int4 / int8: weight-only `weight_only_matmul` (symmetric, groups of 128 / per channel);
* svdq: `svdquant_fused_matmul`, int4 residual + rank-32 bf16 branch, float activations;
* df11: DFloat11 decode then the bf16 product (`dfloat11_decode` + XLA), only the shapes in
  --df11-shapes (the host encoder is NumPy and slow for 58M values);
* w8a8: int8 × int8 → int32 with per-token × per-channel scales (x already quantized);

each as "pallas" (the kernel; on CPU only with --interpret, which is no speed measurement) and
"reference" (the pure-JAX dequantize-then-matmul path). Timing: one jitted executable runs the
method back to back on R rotated input sets (R sets so their weights exceed ~4× a 60 MB L2), so
the device never waits on the host between calls; a sample is its wall time after
`block_until_ready` over R, after two warm-up runs; the table shows the median of --repeats
samples. Columns: time (µs), achieved bandwidth = floor bytes / time (floor: packed weights +
scales + activations + output, each once) and its fraction of the device-to-device copy
bandwidth measured in the same run, speedup over bf16 (t_bf16 / t) and over the reference.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine_line

from feynkit.compression.kernels import (
    dfloat11_decode,
    quantize_per_channel,
    quantize_per_token,
    svdquant_fused_matmul,
    w8a8_matmul,
    weight_only_matmul,
)
from feynkit.compression.quant.dfloat11 import dfloat11_compress
from feynkit.compression.quant.qarray import quantize

GPU_SHAPES = ["4096x4096", "4096x14336", "14336x4096"]
CPU_SHAPES = ["512x512", "512x1024"]
METHODS = ("bf16", "int4", "int8", "svdq", "df11", "w8a8")
RANK, GROUP = 32, 128
_DF11 = {}


def _shape(s):
    k, n = (int(v) for v in s.lower().split("x"))
    return k, n


def _weights(method, k, n, m, key, impl):
    """(fn, args, floor bytes) for one input set."""
    kw, kx, kl = jax.random.split(key, 3)
    w = (0.02 * jax.random.normal(kw, (k, n))).astype(jnp.bfloat16)
    x = jax.random.normal(kx, (m, k)).astype(jnp.bfloat16)
    io = 2 * m * k + 2 * m * n
    if method == "bf16":
        return (lambda x, w: x @ w), (x, w), 2 * k * n + io
    if method in ("int4", "int8"):
        bits, g = (4, GROUP) if method == "int4" else (8, k)
        q = quantize(w, bits, group_size=g)

        def fn(x, c, s):
            return weight_only_matmul(x, c, s, bits=bits, group_size=g, k=k, implementation=impl)

        return fn, (x, q.codes, q.scale), q.codes.size + 4 * q.scale.size + io
    if method == "svdq":
        q = quantize(w, 4, group_size=GROUP)
        l1 = (0.1 * jax.random.normal(kl, (k, RANK))).astype(jnp.bfloat16)
        l2 = (0.1 * jax.random.normal(kl, (RANK, n))).astype(jnp.bfloat16)

        def fn(x, l1, l2, c, s):
            return svdquant_fused_matmul(
                x, l1, l2, c, s, bits=4, group_size=GROUP, k=k, implementation=impl
            )

        floor = q.codes.size + 4 * q.scale.size + 2 * RANK * (k + n) + io
        return fn, (x, l1, l2, q.codes, q.scale), floor
    if method == "df11":
        ck = (k, n, int(jax.random.key_data(key).sum()))  # the host encoder is slow: once per set
        if ck not in _DF11:
            _DF11[ck] = dfloat11_compress(np.asarray(w), block_size=512)
        d = _DF11[ck]

        def fn(x, d):
            return x @ dfloat11_decode(d, implementation=impl)

        return fn, (x, d), d.nbytes + io
    if method == "w8a8":
        xq, sx = quantize_per_token(x)
        wq, sw = quantize_per_channel(w)

        def fn(xq, sx, wq, sw):
            return w8a8_matmul(xq, sx, wq, sw, implementation=impl, out_dtype=jnp.bfloat16)

        return fn, (xq, sx, wq, sw), k * n + m * k + 4 * (m + n) + 2 * m * n
    raise ValueError(method)


def _time(fn, sets, repeats):
    """Median seconds per call over rotated sets, all calls inside one executable."""
    run = jax.jit(lambda sets: [fn(*s) for s in sets])
    for _ in range(2):
        jax.block_until_ready(run(sets))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(sets))
        samples.append((time.perf_counter() - t0) / len(sets))
    return statistics.median(samples), min(samples)


def _measure(method, impl, k, n, m, key, args, bw):
    """One table row: time, bandwidth and (with --check) the error against the reference."""
    per_set = 2 * k * n if method == "bf16" else k * n
    r = int(np.clip(args.rotate_bytes // per_set, 1, args.max_sets))
    if method == "df11":
        r = min(r, 4)
    sets, floor, fn = [], 0, None
    for i in range(r):
        fn, a, floor = _weights(method, k, n, m, jax.random.fold_in(key, i), impl)
        sets.append(a)
    row = dict(shape=f"{k}x{n}", tokens=m, method=method, impl=impl, sets=r, floor_bytes=int(floor))
    if args.check and impl == "pallas":
        ref_fn, _, _ = _weights(method, k, n, m, jax.random.fold_in(key, 0), "reference")
        out = np.asarray(jax.jit(fn)(*sets[0]).astype(jnp.float32), np.float64)
        ref = np.asarray(jax.jit(ref_fn)(*sets[0]).astype(jnp.float32), np.float64)
        row["rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        row["finite"] = bool(np.isfinite(out).all())
    t, t_min = _time(fn, sets, args.repeats)
    row.update(time_us=t * 1e6, min_us=t_min * 1e6, gbps=floor / t / 1e9, copy_frac=floor / t / bw)
    return row


def copy_bandwidth(nbytes, repeats):
    a = jnp.zeros((nbytes,), jnp.uint8) + 1
    t, _ = _time(lambda a: a + 1, [(a,)], repeats)
    return 2 * nbytes / t


def main():
    gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=GPU_SHAPES if gpu else CPU_SHAPES)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64] if gpu else [1, 16])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--df11-shapes", nargs="*", default=["4096x4096"] if gpu else CPU_SHAPES[:1])
    p.add_argument("--repeats", type=int, default=30 if gpu else 5)
    p.add_argument(
        "--rotate-bytes",
        type=float,
        default=256e6 if gpu else 16e6,
        help="total weight bytes over the rotated sets (several times the L2)",
    )
    p.add_argument("--max-sets", type=int, default=32)
    p.add_argument(
        "--interpret",
        action="store_true",
        help="off a GPU, also run the kernels in Pallas interpret mode (no speed)",
    )
    p.add_argument("--check", action="store_true", help="kernel vs reference ‖Δ‖/‖ref‖")
    p.add_argument("--json", default=None, help="write all rows to this file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    impls = ["pallas", "reference"] if (gpu or args.interpret) else ["reference"]
    print(machine_line())
    if not gpu:
        print(
            "no GPU: CPU timings of the XLA paths"
            + (" + interpreted kernels" if args.interpret else "")
            + "; the kernels' speed must be measured on a GPU"
        )
    bw = copy_bandwidth(int(2e9 if gpu else 64e6), args.repeats)
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
    rows, key = [], jax.random.key(args.seed)
    df11_shapes = {_shape(s) for s in args.df11_shapes}
    for shape in args.shapes:
        k, n = _shape(shape)
        shape = f"{k}x{n}"
        for m in args.tokens:
            t_base = None
            results = {}
            for method in args.methods:
                if method == "df11" and (k, n) not in df11_shapes:
                    continue
                for impl in impls if method != "bf16" else ["xla"]:
                    try:  # one kernel failing to lower must not end a short GPU lease
                        row = _measure(method, impl, k, n, m, key, args, bw)
                    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
                        row = dict(
                            shape=shape,
                            tokens=m,
                            method=method,
                            impl=impl,
                            error=f"{type(e).__name__}: {e}"[:300],
                        )
                        print(f"FAILED {shape} M={m} {method}/{impl}: {row['error']}", flush=True)
                    if "time_us" in row:
                        if method == "bf16":
                            t_base = row["time_us"] / 1e6
                        results[(method, impl)] = row["time_us"] / 1e6
                    rows.append(row)
            for row in rows:
                if row["shape"] == shape and row["tokens"] == m and "time_us" in row:
                    t = row["time_us"] / 1e6
                    row["x_bf16"] = t_base / t if t_base else float("nan")
                    ref = results.get((row["method"], "reference"))
                    row["x_ref"] = ref / t if ref else float("nan")
    head = (
        f"{'shape':>11} {'M':>3} {'method':>6} {'impl':>9} {'time us':>9} {'GB/s':>7} "
        f"{'copy%':>6} {'x bf16':>7} {'x ref':>6}" + (f" {'rel err':>8}" if args.check else "")
    )
    print(head)
    for r in rows:
        if "error" in r:
            print(
                f"{r['shape']:>11} {r['tokens']:>3} {r['method']:>6} {r['impl']:>9} FAILED "
                f"{r['error'][:80]}"
            )
            continue
        line = (
            f"{r['shape']:>11} {r['tokens']:>3} {r['method']:>6} {r['impl']:>9} "
            f"{r['time_us']:9.1f} {r['gbps']:7.1f} {100 * r['copy_frac']:5.1f}% "
            f"{r['x_bf16']:7.2f} {r['x_ref']:6.2f}"
        )
        if args.check:
            err = r.get("rel_err")
            line += f" {err:8.1e}" if err is not None else " " * 9
            if err is not None and not r["finite"]:
                line += " NaN!"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_line(), copy_gbps=bw / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
