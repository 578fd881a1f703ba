"""Trains SpecDec++'s acceptance-prediction head on target/draft agreement (arXiv 2405.19715;
Kaffaljidhmah2/SpecDec_pp @937aee2, `specdec_pp/train.py`, `data/gen_acceptance.py`).

Only the head (models/acceptance_head.py) learns; target and draft are frozen. For a text
x, at every position t the draft proposes d_t from q(. | x_<t) and gets the label

    sampling: y_t = min(1, p(d_t) / q(d_t)),  d_t ~ q      (the official soft label)
    greedy:   y_t = 1[argmax p = argmax q],    d_t = argmax q

with p the target's distribution after the same prefix. The head then reads the draft's
final-norm state at d_t in a sequence where the proposals replace the text's tokens with
probability 1 - mixing_ratio (the official `mixing_ratio 0.15`: the draft sees mostly its own
tokens, as when it drafts), and only replaced positions are scored. The loss is the official
class-weighted soft BCE, rejections weighted by `weight_mismatch` (6 in the README):

    loss = sum_t [w (1 - y_t) (-log(1 - a_t)) + y_t (-log a_t)] / sum_t [w (1 - y_t) + y_t].

The official data are target-generated answers to Alpaca prompts; here it is whatever text
the batches hold (the embedded corpus), a cheaper stand-in.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.acceptance_head import (AcceptanceHead, AcceptanceHeadConfig,
                                    DraftWithAcceptanceHead)
from models.transformer import Transformer
from train import checkpoint, optim

Batch = dict[str, np.ndarray]
META_FILE = "acceptance_head.json"
LABELS = ("greedy", "sampling")


@dataclasses.dataclass(frozen=True)
class HeadTrainConfig:
    """labels: "greedy" (exact-match acceptance, for specdecpp_greedy) or "sampling" (the
    official min(1, p/q) soft labels at temperature 1, for specdecpp)."""
    labels: str = "greedy"
    num_layers: int = 3
    weight_mismatch: float = 6.0
    mixing_ratio: float = 0.15
    steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.labels not in LABELS:
            raise ValueError(f"labels={self.labels!r}; valid: {LABELS}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.weight_mismatch <= 0:
            raise ValueError(f"weight_mismatch={self.weight_mismatch} must be positive")
        if not 0.0 <= self.mixing_ratio <= 1.0:
            raise ValueError(f"mixing_ratio={self.mixing_ratio} must be in [0, 1]")


def weighted_bce(log_odds: jax.Array, labels: jax.Array, mask: jax.Array,
                 weight_mismatch: float) -> jax.Array:
    """The official soft BCE with rejections weighted by weight_mismatch, normalised by the
    total weight. log_odds: the head's logit of acceptance; labels: soft y in [0, 1]."""
    mask = mask.astype(jnp.float32)
    w_reject = weight_mismatch * (1.0 - labels) * mask
    w_accept = labels * mask
    # -log a = softplus(-z), -log(1 - a) = softplus(z) for a = sigmoid(z).
    total = w_reject * jax.nn.softplus(log_odds) + w_accept * jax.nn.softplus(-log_odds)
    return jnp.sum(total) / jnp.maximum(jnp.sum(w_reject + w_accept), 1e-9)


def head_inputs(target: Transformer, model: DraftWithAcceptanceHead, batch, rng: jax.Array,
                config: HeadTrainConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(draft states f32[B, T, d], labels f32[B, T], mask bool[B, T]) for one batch: the
    label at position t is for the proposal that replaced inputs[t] (proposed after
    inputs[:t]); everything is constant for the head."""
    kwargs = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    tokens = batch["inputs"]
    log_p = jax.nn.log_softmax(target(tokens, **kwargs).logits, axis=-1)[:, :-1]
    log_q = jax.nn.log_softmax(model(tokens, **kwargs).logits, axis=-1)[:, :-1]
    key_draft, key_mix = jax.random.split(rng)
    if config.labels == "greedy":
        proposal = jnp.argmax(log_q, axis=-1).astype(jnp.int32)
        labels = (proposal == jnp.argmax(log_p, axis=-1)).astype(jnp.float32)
    else:
        proposal = jax.random.categorical(key_draft, log_q, axis=-1).astype(jnp.int32)
        take = lambda lp: jnp.take_along_axis(lp, proposal[..., None], -1)[..., 0]  # noqa: E731
        labels = jnp.exp(jnp.minimum(0.0, take(log_p) - take(log_q)))
    seg = batch["segment_ids"]
    # A proposal may stand at t only where inputs[t] continues the document of inputs[t-1].
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    replace = same_doc & (jax.random.uniform(key_mix, same_doc.shape) >= config.mixing_ratio)
    mixed = tokens.at[:, 1:].set(jnp.where(replace, proposal, tokens[:, 1:]))
    hidden = model.hidden_states(mixed, **kwargs)
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    return (jax.lax.stop_gradient(hidden), pad(labels), pad(replace))


def _terms(head: AcceptanceHead, hidden, labels, mask, weight_mismatch: float):
    log_odds = head.accept_log_odds(hidden)
    loss = weighted_bce(log_odds, labels, mask, weight_mismatch)
    m = mask.astype(jnp.float32)
    a = jax.nn.sigmoid(log_odds)
    metrics = {"positions": jnp.sum(m), "label_mean": jnp.sum(labels * m),
               "pred_mean": jnp.sum(a * m),
               # Accuracy of the thresholded prediction against the thresholded label.
               "accuracy": jnp.sum(((a > 0.5) == (labels > 0.5)) * m)}
    return loss, metrics


def _device_batch(batch: Batch) -> dict[str, jax.Array]:
    return {k: jnp.asarray(batch[k]) for k in ("inputs", "segment_ids", "positions")}


@nnx.jit(static_argnums=(4,))
def _inputs(target, model, batch, rng, config):
    return head_inputs(target, model, batch, rng, config)


def train_head(target: Transformer, draft: Transformer, batches: Iterable[Batch],
               config: HeadTrainConfig, *, log: Callable[[dict[str, Any]], None] | None = None,
               log_every: int = 50) -> DraftWithAcceptanceHead:
    """`draft` with a new acceptance head trained for config.steps batches of `batches`
    (train/data.py batches: inputs, segment_ids, positions)."""
    model = DraftWithAcceptanceHead.new(draft, config.num_layers, seed=config.seed)
    schedule = optim.make_schedule(lr=config.lr, steps=config.steps,
                                   warmup_steps=min(config.warmup_steps, config.steps))
    optimizer = nnx.Optimizer(model.head, optim.make_optimizer(schedule, weight_decay=0.0),
                              wrt=nnx.Param)

    @nnx.jit
    def train_step(head, optimizer, hidden, labels, mask):
        def loss_fn(head):
            return _terms(head, hidden, labels, mask, config.weight_mismatch)
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(head)
        optimizer.update(head, grads)
        return loss, metrics

    iterator = iter(batches)
    rng = jax.random.key(config.seed)
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"the batches ran out after {step - 1} of steps={config.steps}; "
                             "give a repeating iterator") from None
        rng, key = jax.random.split(rng)
        hidden, labels, mask = _inputs(target, model, _device_batch(batch), key, config)
        loss, metrics = train_step(model.head, optimizer, hidden, labels, mask)
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"acceptance-head loss is {float(loss)} at step {step}; "
                                     f"lower lr={config.lr}")
        if log is not None and (step % log_every == 0 or step == config.steps):
            n = max(float(metrics["positions"]), 1.0)
            log({"step": step, "loss": float(loss), "seconds": time.perf_counter() - start,
                 **{k: float(v) / n for k, v in metrics.items() if k != "positions"}})
    return model


def evaluate(target: Transformer, model: DraftWithAcceptanceHead, batches: Iterable[Batch],
             config: HeadTrainConfig) -> dict[str, float]:
    """Weighted BCE (mean over batches) and per-position label mean, predicted mean and
    thresholded accuracy on `batches`."""
    totals: dict[str, float] = {}
    losses = []
    rng = jax.random.key(config.seed + 1)
    for batch in batches:
        rng, key = jax.random.split(rng)
        hidden, labels, mask = _inputs(target, model, _device_batch(batch), key, config)
        loss, metrics = _eval_terms(model.head, hidden, labels, mask, config.weight_mismatch)
        losses.append(float(loss))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = max(totals.pop("positions", 0.0), 1.0)
    return {"loss": float(np.mean(losses)) if losses else float("nan"),
            **{k: v / n for k, v in totals.items()}}


_eval_terms = nnx.jit(_terms, static_argnums=(4,))


def save_head(model: DraftWithAcceptanceHead, directory: str | os.PathLike,
              config: HeadTrainConfig) -> None:
    """Writes the head's parameters (orbax) and how it was trained (JSON)."""
    checkpoint.save_module(directory, model.head, META_FILE,
                           {"d_model": model.head.config.d_model,
                            "train": dataclasses.asdict(config)})


def load_head(directory: str | os.PathLike, draft: Transformer) -> DraftWithAcceptanceHead:
    """`draft` with the head saved in `directory` (checked to fit the draft's width)."""
    meta = checkpoint.read_module_meta(directory, META_FILE, "acceptance head")
    config = HeadTrainConfig(**meta["train"])
    if meta["d_model"] != draft.config.d_model:
        raise ValueError(f"the acceptance head in {os.fspath(directory)!r} reads d_model="
                         f"{meta['d_model']} states, the draft has d_model="
                         f"{draft.config.d_model}")
    head = checkpoint.restore_module(directory, AcceptanceHead(
        AcceptanceHeadConfig(meta["d_model"], config.num_layers), rngs=nnx.Rngs(0)))
    return DraftWithAcceptanceHead(draft, head)
