"""Optimizer and learning-rate schedules for training: AdamW (Loshchilov & Hutter 2019,
arXiv 1711.05101) behind global-norm clipping, with a linear warmup followed by either cosine
decay or warmup-stable-decay (WSD; Hu et al. 2024, arXiv 2404.06395).

A schedule maps the number of optimizer updates already applied (optax's `count`, 0 for the
first update) to a learning rate:

    warmup    step < warmup_steps:  lr * (step + 1) / warmup_steps  (the first update is not
              wasted at lr 0, and the last warmup update runs at the peak)
    cosine    then lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2, p = (step - warmup) /
              (steps - warmup), clipped to [0, 1]
    wsd       then lr until the last round(decay_fraction * steps) steps, which decay linearly
              to lr_min, reached at step == steps

with lr_min = min_lr_ratio * lr.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "wsd")

Schedule = Callable[[jax.Array | int], jax.Array]


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {SCHEDULES}")


def wsd_decay_start(steps: int, decay_fraction: float) -> int:
    """First step of the WSD decay phase."""
    return steps - int(round(decay_fraction * steps))


def make_schedule(*, lr: float, steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> Schedule:
    """The learning rate as a jit-friendly function of the update count (see module doc)."""
    check_schedule(schedule)
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, steps={steps}]")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction={decay_fraction} must be in [0, 1]")
    decay_start = wsd_decay_start(steps, decay_fraction)
    if schedule == "wsd" and decay_start < warmup_steps:
        raise ValueError(
            f"wsd decay starts at step {decay_start} (decay_fraction={decay_fraction} of "
            f"steps={steps}), before warmup ends at warmup_steps={warmup_steps}")
    lr_min = min_lr_ratio * lr

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (step + 1.0) / max(warmup_steps, 1)
        if schedule == "cosine":
            p = jnp.clip((step - warmup_steps) / max(steps - warmup_steps, 1), 0.0, 1.0)
            after = lr_min + (lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        else:
            p = jnp.clip((step - decay_start) / max(steps - decay_start, 1), 0.0, 1.0)
            after = lr + (lr_min - lr) * p
        return jnp.where(step < warmup_steps, warm, after)

    return fn


def decay_mask(params):
    """Weight decay on matrices only: norm scales (1-D) stay undecayed, as is usual."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(schedule: Schedule, *, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when clip_norm is None or 0), then AdamW."""
    if clip_norm is not None and clip_norm < 0:
        raise ValueError(f"clip_norm={clip_norm} must be positive, 0 or None (no clipping)")
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask)
    if not clip_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
