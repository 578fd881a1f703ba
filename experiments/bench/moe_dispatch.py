"""Mixture-of-experts dispatch cost: forward + backward time of one MoE layer (E experts,
top-k) beside a dense SwiGLU layer doing the same active compute (hidden size k times the
expert's), measured in the same run (models/core/moe.py, moe_dispatch.py).

    python -m experiments.bench.moe_dispatch [--cases default] [--repeats 7]

For each dispatch (ragged, capacity, dense all-experts reference) the metric is
time_over_active_dense = t(MoE layer fwd+bwd) / t(dense SwiGLU with hidden k*h fwd+bwd):
goal <= 1.5 for a dispatch whose work grows with k; the dense reference should sit near E/k.
The MoE time includes the router matmul, softmax/top-k and the Switch balance loss, which a
real layer pays too. Times are medians over `repeats` calls after a compile-and-warm-up call.
Run it alone on the machine (tests/benchmarks hold an exclusive lock for timing).

Prints one JSON line per (case, dispatch).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.core import moe_dispatch, moe_routing

CASES = {
    # name: (tokens N, d_model, expert hidden h, experts E, top_k k)
    "default": (4096, 256, 256, 16, 2),      # batch 8 x 512 tokens of a CPU-sized model
    "wide": (2048, 512, 512, 16, 2),
    "quick": (256, 64, 64, 16, 2),           # seconds; what a smoke test runs
}
CAPACITY_FACTOR = 1.25


def _median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))   # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _dense_swiglu(x, gate, up, down):
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def _moe_layer(dispatch: str, top_k: int):
    def layer(x, router, gate, up, down):
        routing = moe_routing.route(x @ router, top_k)
        args = (x, routing.weights, routing.experts, gate, up, down)
        if dispatch == "capacity":
            out, dropped = moe_dispatch.capacity_limited(*args, capacity_factor=CAPACITY_FACTOR)
        else:
            out, dropped = getattr(moe_dispatch, dispatch)(*args)
        return out, 0.01 * moe_routing.balance_loss(routing), dropped
    return layer


def _fwd_bwd(layer, has_aux: bool):
    """jit(cotangent, *inputs -> grads of sum(out * cotangent) [+ aux] w.r.t. every input)."""
    def loss(cot, *inputs):
        if has_aux:
            out, aux, dropped = layer(*inputs)
            return jnp.sum(out * cot) + aux, dropped
        return jnp.sum(layer(*inputs) * cot), jnp.zeros(())

    def step(cot, *inputs):
        argnums = tuple(range(1, 1 + len(inputs)))
        return jax.grad(loss, argnums=argnums, has_aux=True)(cot, *inputs)
    return jax.jit(step)


def run_case(name: str, repeats: int) -> list[dict]:
    n, d, h, e, k = CASES[name]
    rng = np.random.default_rng(0)
    normal = lambda *shape, std: jnp.asarray(rng.normal(size=shape) * std, jnp.float32)
    x, cot = normal(n, d, std=1.0), normal(n, d, std=1.0)
    router = normal(d, e, std=d ** -0.5)
    gate, up = normal(e, d, h, std=d ** -0.5), normal(e, d, h, std=d ** -0.5)
    down = normal(e, h, d, std=h ** -0.5)
    dgate, dup = normal(d, k * h, std=d ** -0.5), normal(d, k * h, std=d ** -0.5)
    ddown = normal(k * h, d, std=h ** -0.5)

    dense_time = _median_seconds(_fwd_bwd(_dense_swiglu, False), (cot, x, dgate, dup, ddown),
                                 repeats)
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
               "backend": jax.default_backend(), "jax": jax.__version__,
               "load_avg_1m": round(os.getloadavg()[0], 2)}
    rows = []
    for dispatch in moe_dispatch.DISPATCHES:
        step = _fwd_bwd(_moe_layer(dispatch, k), True)
        args = (cot, x, router, gate, up, down)
        seconds = _median_seconds(step, args, repeats)
        dropped = float(jax.jit(_moe_layer(dispatch, k))(x, router, gate, up, down)[2])
        goal = e / k if dispatch == "dense" else 1.5
        rows.append({"bench": "moe_dispatch", "case": name, "dispatch": dispatch,
                     "metric": "time_over_active_dense", "value": round(seconds / dense_time, 3),
                     "goal": goal, "goal_kind": "near" if dispatch == "dense" else "at_most",
                     "moe_seconds": round(seconds, 5),
                     "active_dense_seconds": round(dense_time, 5), "tokens": n, "d_model": d,
                     "expert_hidden": h, "num_experts": e, "top_k": k,
                     "capacity_factor": CAPACITY_FACTOR if dispatch == "capacity" else None,
                     "dropped_fraction": round(dropped, 4), "repeats": repeats, **machine})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="default,wide",
                   help=f"comma-separated subset of {list(CASES)}")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    for name in cases:
        if name not in CASES:
            raise ValueError(f"unknown case {name!r}; valid: {list(CASES)}")
    for name in cases:
        for row in run_case(name, args.repeats):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
