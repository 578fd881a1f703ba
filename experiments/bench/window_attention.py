"""Window attention speed: the blocked and Pallas implementations beside dense and flash baselines.

Multi-scale window attention (MSWA, arXiv 2501.01039) only needs the pairs inside each head's
window, about T * w per head instead of the T^2 / 2 of causal attention; this measures how much
of that saving each implementation of ``pallas_kernels.window_attention`` turns into speed.

CPU part (runs on any backend; the goal is for CPU): forward+backward wall time of
``xla_blocked`` beside the dense ``reference`` for T in {1024, 4096} and mean windows {64, 256}
(B=1, 4 heads, D=64, f32). Multi-scale windows (w/2, 3w/4, 5w/4, 3w/2) have mean w; a uniform
variant gives every head w. The ideal speedup is causal pairs / in-window pairs;
``fraction_of_ideal`` = measured speedup / ideal (goal 0.7). The dense reference computes all
T^2 pairs, so a value above 1 is possible and means the blocked path also skips the masked half.

GPU part (only when jax.default_backend() == "gpu"; skipped with a message elsewhere), following
shared/specs/kernels.md §5.2: bf16, D=128, 16 heads, 32k tokens per batch, T in {4k, 16k, 32k},
uniform windows (1024) and multi-scale windows (128, 512, 2048, 8192; 4 heads each). The Pallas
kernel is timed beside dense XLA attention (T=4k only; it is O(T^2) in memory),
``jax.nn.dot_product_attention(implementation="cudnn", local_window_size=...)`` (one call per
window group) and jax's Triton causal flash attention ``pallas.ops.gpu.attention.mha``. FLOPs
counted are the useful (in-window) ones, 4 D P forward and 14 D P forward+backward for P pairs
(the FlashAttention convention); ``useful_fraction_of_peak`` divides the achieved rate by a bf16
matmul peak measured in the same run (goal 0.5), ``speedup_vs_flash`` = flash time / kernel time
(goal 3.0). Correctness is gated first: the kernel's output against the f32 reference.

    python -m experiments.bench.window_attention [--part all|cpu|gpu] [--repeats N]

prints one JSON line per result with keys bench, case, metric, value, goal and details.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import blocked_window_attention, window_attention
from pallas_kernels import window_attention_reference
from pallas_kernels.blocked_attention import default_block
from pallas_kernels.window_attention import default_blocks
from pallas_kernels.window_attention_tpu import fwd_tables

BENCH = "window_attention"


def machine() -> dict:
    dev = jax.devices()[0]
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "device_kind": dev.device_kind,
            # Other processes may share the machine: the 1-minute load average when measured.
            "loadavg_1m": os.getloadavg()[0]}


def emit(case: str, metric: str, value, goal, **details) -> None:
    print(json.dumps({"bench": BENCH, "case": case, "metric": metric, "value": value,
                      "goal": goal, **details, "machine": machine()}), flush=True)


def window_pairs(w: int, t: int) -> int:
    """Query-key pairs one head computes: P(w, T) = w T - w (w - 1) / 2, or T (T + 1) / 2."""
    return w * t - w * (w - 1) // 2 if w < t else t * (t + 1) // 2


def multiscale(mean_w: int, heads: int) -> tuple[int, ...]:
    """Windows (w/2, 3w/4, 5w/4, 3w/2) repeated over the heads: multi-scale with mean w."""
    base = (mean_w // 2, 3 * mean_w // 4, 5 * mean_w // 4, 3 * mean_w // 2)
    return tuple(base[h % 4] for h in range(heads))


def random_inputs(b, t, hq, hkv, d, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = ((b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d), (b, t, hq, d))
    return tuple(jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes))


def forward_backward(fn):
    """Jitted (q, k, v, do) -> (out, (dq, dk, dv)): one training step's attention work."""
    def step(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)
    return jax.jit(step)


def time_interleaved(fns: dict, args: dict, warmup: int, repeats: int,
                     min_round_s: float = 0.0) -> dict:
    """Median seconds per call of each jitted fn, timed in alternating rounds.

    Alternating spreads any load from other processes over every implementation alike instead
    of penalising whichever ran during a busy spell. Within a round a fast fn runs enough times
    to fill ``min_round_s``, so cheap and expensive fns get comparably robust medians. Compile
    time (the first call) is reported apart.
    """
    first_s, per_round, times = {}, {}, {name: [] for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args[name]))
        first_s[name] = time.perf_counter() - start
        for _ in range(max(warmup - 1, 1)):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
        per_round[name] = max(1, int(min_round_s / (time.perf_counter() - start)))
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(per_round[name]):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args[name]))
                times[name].append(time.perf_counter() - start)
    return {name: {"median_s": float(np.median(ts)), "min_s": float(np.min(ts)),
                   "calls": len(ts), "first_call_s": first_s[name]}
            for name, ts in times.items()}


# --------------------------------------------------------------------------------------------
# CPU part: xla_blocked vs dense reference.
# --------------------------------------------------------------------------------------------
def blocked_executed_pairs(windows, t: int) -> int:
    """Score entries the blocked path computes: per head T_pad x (n + 1) c, or T^2 if dense."""
    total = 0
    for w in windows:
        w = min(w, t)
        c = default_block(w)
        t_pad = -(-t // c) * c
        span = (-(-(w - 1) // c) + 1) * c
        total += t * t if span >= t_pad else t_pad * span
    return total


def cpu_part(lengths, mean_windows, repeats: int) -> None:
    b, h, d = 1, 4, 64
    for t in lengths:
        q, k, v, do = random_inputs(b, t, h, h, d, jnp.float32)
        for mean_w in mean_windows:
            variants = {"": multiscale(mean_w, h), "_uniform": (mean_w,) * h}
            fns = {"dense": forward_backward(functools.partial(
                window_attention_reference, windows=variants[""]))}
            for suffix, windows in variants.items():
                fns["blocked" + suffix] = forward_backward(functools.partial(
                    blocked_window_attention, windows=windows))
            timing = time_interleaved(fns, {name: (q, k, v, do) for name in fns}, warmup=2,
                                      repeats=repeats, min_round_s=0.5)
            causal = h * window_pairs(t, t)
            for suffix, windows in variants.items():
                useful = sum(window_pairs(w, t) for w in windows)
                ideal = causal / useful
                speedup = timing["dense"]["median_s"] / timing["blocked" + suffix]["median_s"]
                emit(f"T{t}_w{mean_w}{suffix}", "fraction_of_ideal", speedup / ideal, 0.7,
                     speedup=speedup, ideal_speedup=ideal, windows=list(windows),
                     shape={"B": b, "T": t, "H": h, "Hkv": h, "D": d, "dtype": "float32"},
                     dense=timing["dense"], **{"pass": "fwd+bwd"},
                     blocked=timing["blocked" + suffix],
                     pairs={"causal": causal, "in_window": useful, "dense_executed": h * t * t,
                            "blocked_executed": blocked_executed_pairs(windows, t)},
                     note="dense = impl='reference' (all T^2 pairs, masked); its time is shared "
                          "by the multi-scale and uniform cases of the same T and mean window.")


# --------------------------------------------------------------------------------------------
# GPU part: Pallas kernel vs dense XLA, cuDNN local window and Triton causal flash attention.
# --------------------------------------------------------------------------------------------
def measure_matmul_peak(n: int = 8192, repeats: int = 20) -> float:
    """bf16 matmul FLOP/s (median of ``repeats``) on an n^3 product: the roofline to compare to."""
    a, b_ = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    mm = jax.jit(lambda x, y: x @ y)
    timing = time_interleaved({"mm": mm}, {"mm": (a, b_)}, warmup=3, repeats=repeats)
    return 2 * n ** 3 / timing["mm"]["median_s"]


def _dense_xla(q, k, v, windows, scale):
    """Plain XLA attention in bf16 with f32 softmax over a dense [B, H, T, T] mask."""
    t = q.shape[1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    w = jnp.asarray(windows)[:, None, None]
    s = jnp.where((j <= i) & (j > i - w), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _cudnn_grouped(q, k, v, windows, scale):
    """cuDNN flash attention with a local window, one call per run of equal-window heads."""
    outs, start = [], 0
    while start < len(windows):
        stop = start
        while stop < len(windows) and windows[stop] == windows[start]:
            stop += 1
        sl = slice(start, stop)
        outs.append(jax.nn.dot_product_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], scale=scale, is_causal=True,
            local_window_size=(windows[start] - 1, 0), implementation="cudnn"))
        start = stop
    return jnp.concatenate(outs, axis=2)


def _executed_tile_pairs(windows, t, bq, bk, batch):
    start, count, _ = fwd_tables(t, bq, bk, tuple(min(w, t) for w in windows))
    return int(count.sum()) * bq * bk * batch


def gpu_part(repeats: int, lengths=(4096, 16384, 32768), heads: int = 16,
             head_dim: int = 128, tokens: int = 32768, matmul_n: int = 8192) -> None:
    with warnings.catch_warnings():  # 0.11 deprecates the Triton ops at import (kernels.md §1.4)
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import attention as triton_flash
    warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
    peak = measure_matmul_peak(matmul_n)
    emit(f"matmul_bf16_{matmul_n}", "peak_tflops", peak / 1e12, None)
    h, d = heads, head_dim
    scale = 1 / math.sqrt(d)
    for t in lengths:
        b = max(1, tokens // t)
        q, k, v, do = random_inputs(b, t, h, h, d, jnp.bfloat16)
        configs = {"uniform1024": (1024,) * h,
                   "multiscale": tuple(w for w in (128, 512, 2048, 8192) for _ in range(h // 4))}
        for wname, windows in configs.items():
            windows = tuple(min(w, t) for w in windows)
            kernel = functools.partial(window_attention, windows=windows, scale=scale,
                                       impl="pallas")
            if t == lengths[0]:  # correctness gate on one sequence, against the f32 reference
                ref = jax.jit(functools.partial(window_attention_reference, windows=windows,
                                                scale=scale))
                err = float(jnp.max(jnp.abs(
                    jax.jit(kernel)(q[:1], k[:1], v[:1]).astype(jnp.float32)
                    - ref(q[:1], k[:1], v[:1]).astype(jnp.float32))))
                emit(f"T{t}_{wname}", "max_abs_err_vs_reference", err, 2e-2,
                     note="bf16 kernel vs f32 dense reference, batch row 0")
            impls = {
                "pallas": kernel,
                "flash_causal": lambda q_, k_, v_: triton_flash.mha(q_, k_, v_, None,
                                                                   sm_scale=scale, causal=True),
                "cudnn_window": functools.partial(_cudnn_grouped, windows=windows, scale=scale),
            }
            if t == lengths[0]:  # O(T^2) memory: only at the shortest length
                impls["dense_xla"] = functools.partial(_dense_xla, windows=windows, scale=scale)
            useful_pairs = b * sum(window_pairs(w, t) for w in windows)
            causal_pairs = b * h * window_pairs(t, t)
            bq, bk, _, _ = default_blocks("gpu", t)
            for pass_, flops_per_pair in (("fwd", 4 * d), ("fwd_bwd", 14 * d)):
                timing, errors = {}, {}
                for name, fn in impls.items():
                    jitted = jax.jit(fn) if pass_ == "fwd" else forward_backward(fn)
                    args = (q, k, v) if pass_ == "fwd" else (q, k, v, do)
                    try:
                        timing.update(time_interleaved({name: jitted}, {name: args}, warmup=3,
                                                       repeats=repeats))
                    except Exception as e:  # e.g. dense OOM, cuDNN unsupported: report, go on
                        errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
                pairs = {n: causal_pairs if n == "flash_causal" else useful_pairs for n in timing}
                tflops = {n: flops_per_pair * pairs[n] / timing[n]["median_s"] / 1e12
                          for n in timing}
                useful_tflops = {n: flops_per_pair * useful_pairs / timing[n]["median_s"] / 1e12
                                 for n in timing}
                details = dict(
                    shape={"B": b, "T": t, "H": h, "Hkv": h, "D": d, "dtype": "bfloat16"},
                    windows=sorted(set(windows)), timing=timing, errors=errors,
                    executed_tflops=tflops, useful_tflops=useful_tflops,
                    peak_tflops=peak / 1e12, blocks_fwd={"block_q": bq, "block_k": bk},
                    useful_over_executed_tiles=useful_pairs / _executed_tile_pairs(
                        windows, t, bq, bk, b),
                    **{"pass": pass_})
                case = f"T{t}_{wname}_{pass_}"
                pallas_s = timing.get("pallas", {}).get("median_s")
                emit(case, "useful_fraction_of_peak",
                     None if pallas_s is None else useful_tflops["pallas"] * 1e12 / peak, 0.5,
                     **details)
                flash_s = timing.get("flash_causal", {}).get("median_s")
                emit(case, "speedup_vs_flash",
                     None if pallas_s is None or flash_s is None else flash_s / pallas_s, 3.0,
                     ideal_speedup=causal_pairs / useful_pairs, **details)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("all", "cpu", "gpu"), default="all")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per implementation (default: 7 CPU part, 20 GPU part)")
    p.add_argument("--lengths", default="1024,4096", help="CPU part sequence lengths")
    p.add_argument("--windows", default="64,256", help="CPU part mean windows")
    args = p.parse_args(argv)
    if args.part in ("all", "cpu"):
        cpu_part([int(x) for x in args.lengths.split(",")],
                 [int(x) for x in args.windows.split(",")], args.repeats or 7)
    if args.part in ("all", "gpu"):
        if jax.default_backend() == "gpu":
            gpu_part(args.repeats or 20)
        else:
            print(f"window_attention bench: GPU part skipped, jax.default_backend() is "
                  f"{jax.default_backend()!r} (it needs 'gpu').", file=sys.stderr)


if __name__ == "__main__":
    main()
