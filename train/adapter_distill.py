"""Trains Kangaroo's early-exit adapter by distillation from its frozen target (arXiv 2404.18911;
Equationliu/Kangaroo @4f0949d, `train.py`).

Only the adapter (models/early_exit_adapter.py) learns. For every real token the loss is the
soft cross-entropy from the target's next-token distribution to the draft's,

    loss = - sum_v p_target(v) log softmax(head(adapter(h_l)))_v,

where h_l is the target's residual stream after `exit_layer` blocks and head is the target's
frozen output head. Kangaroo logs `prob_acc = sum_v min(p_target, p_draft)`, the probability
that one speculative-sampling step accepts the draft's token; we log it too, with top-1
agreement (the greedy acceptance rate of a single draft).

Kangaroo trains a 67M-parameter adapter for Vicuna-7B with AdamW at lr 3e-5 for 20 epochs;
the defaults here are for tiny CPU targets: a few hundred steps at a larger rate (the adapter
starts as the plain early exit, see its module, so short runs cannot make it worse than
no adapter at the start).

    save_adapter(adapter, directory) / load_adapter(directory, target)
keep it beside the target's workdir; `load_adapter` refuses an adapter of another target.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.early_exit_adapter import AdapterConfig, EarlyExitAdapter
from models.transformer import Transformer
from train import checkpoint, optim
from train.checkpoint import config_to_dict

Batch = dict[str, np.ndarray]
META_FILE = "adapter.json"


@dataclasses.dataclass(frozen=True)
class AdapterTrainConfig:
    exit_layer: int = 2
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")


def distill_terms(adapter: EarlyExitAdapter, target: Transformer, batch: Batch
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(summed soft cross-entropy over real tokens, summed metrics) for one batch; the target
    is treated as a constant."""
    kwargs = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    hidden = jax.lax.stop_gradient(
        target.hidden_at(batch["inputs"], adapter.exit_layer, **kwargs))
    # The target's own distribution continues from the exit states rather than rerunning
    # the shallow blocks.
    final = target.hidden_from(hidden, adapter.exit_layer, target.config.n_layers, **kwargs)
    p_target = jax.lax.stop_gradient(jax.nn.softmax(target.logits(final), axis=-1))
    log_q = jax.nn.log_softmax(adapter.logits(hidden, target, **kwargs), axis=-1)
    mask = batch["loss_mask"].astype(jnp.float32)
    soft_ce = -jnp.sum(p_target * log_q, axis=-1)
    # KL = soft CE minus the target's own entropy: the part the adapter can remove.
    kl = soft_ce + jnp.sum(p_target * jnp.log(jnp.maximum(p_target, 1e-30)), axis=-1)
    prob_acc = jnp.sum(jnp.minimum(p_target, jnp.exp(log_q)), axis=-1)
    top1 = (jnp.argmax(log_q, axis=-1) == jnp.argmax(p_target, axis=-1)).astype(jnp.float32)
    metrics = {"kl": jnp.sum(kl * mask), "prob_acc": jnp.sum(prob_acc * mask),
               "top1_agreement": jnp.sum(top1 * mask), "tokens": jnp.sum(mask)}
    return jnp.sum(soft_ce * mask), metrics


# One compiled evaluation step for every evaluate() call (the before/after comparison
# evaluates two adapters of the same shape).
_eval_terms = nnx.jit(distill_terms)


def _device_batch(batch: Batch) -> dict[str, jax.Array]:
    keys = ("inputs", "segment_ids", "positions", "loss_mask")
    return {k: jnp.asarray(batch[k]) for k in keys}


def evaluate(adapter: EarlyExitAdapter, target: Transformer, batches: Iterable[Batch]
             ) -> dict[str, float]:
    """Mean soft cross-entropy (loss), KL(target || draft), prob_acc and top-1 agreement
    per real token."""
    totals: dict[str, float] = {}
    for batch in batches:
        loss, metrics = _eval_terms(adapter, target, _device_batch(batch))
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    tokens = max(totals.pop("tokens", 0.0), 1.0)
    return {k: v / tokens for k, v in totals.items()}


def train_adapter(target: Transformer, batches: Iterable[Batch], config: AdapterTrainConfig,
                  *, log: Callable[[dict[str, Any]], None] | None = None,
                  log_every: int = 50) -> EarlyExitAdapter:
    """A new adapter for `target`, trained for config.steps batches of `batches` (dicts with
    inputs, segment_ids, positions, loss_mask as train/data.py yields them)."""
    adapter = EarlyExitAdapter.from_target(target, config.exit_layer, seed=config.seed)
    schedule = optim.make_schedule(lr=config.lr, steps=config.steps,
                                   warmup_steps=min(config.warmup_steps, config.steps))
    optimizer = nnx.Optimizer(adapter, optim.make_optimizer(
        schedule, weight_decay=config.weight_decay), wrt=nnx.Param)

    @nnx.jit
    def train_step(adapter, optimizer, target, batch):
        def loss_fn(adapter):
            loss, metrics = distill_terms(adapter, target, batch)
            return loss / jnp.maximum(metrics["tokens"], 1.0), metrics
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(adapter)
        optimizer.update(adapter, grads)
        return loss, metrics

    iterator = iter(batches)
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"the batches ran out after {step - 1} of steps={config.steps}; "
                             "give a repeating iterator") from None
        loss, metrics = train_step(adapter, optimizer, target, _device_batch(batch))
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"adapter distillation loss is {float(loss)} at step "
                                     f"{step}; lower lr={config.lr}")
        if log is not None and (step % log_every == 0 or step == config.steps):
            tokens = max(float(metrics["tokens"]), 1.0)
            log({"step": step, "loss": float(loss),
                 "prob_acc": float(metrics["prob_acc"]) / tokens,
                 "top1_agreement": float(metrics["top1_agreement"]) / tokens,
                 "seconds": time.perf_counter() - start})
    return adapter


def save_adapter(adapter: EarlyExitAdapter, directory: str | os.PathLike) -> None:
    """Writes the adapter's parameters (orbax) and what it was trained for (JSON)."""
    checkpoint.save_module(directory, adapter, META_FILE,
                           {"exit_layer": adapter.exit_layer,
                            "target_config": config_to_dict(adapter.config.target)})


def load_adapter(directory: str | os.PathLike, target: Transformer) -> EarlyExitAdapter:
    """The adapter saved in `directory`, checked to belong to `target`'s configuration."""
    meta = checkpoint.read_module_meta(directory, META_FILE, "adapter")
    expected = json.loads(json.dumps(config_to_dict(target.config)))
    if meta["target_config"] != expected:
        differ = sorted(k for k in set(expected) | set(meta["target_config"])
                        if expected.get(k) != meta["target_config"].get(k))
        raise ValueError(f"the adapter in {os.path.abspath(directory)!r} was trained for "
                         f"another target: config fields {differ} differ")
    return checkpoint.restore_module(directory, EarlyExitAdapter(
        AdapterConfig(target.config, meta["exit_layer"]), rngs=nnx.Rngs(0)))


def distill_workdir(target_workdir: str | os.PathLike, out_dir: str | os.PathLike,
                    config: AdapterTrainConfig, *, data_config=None, eval_batches: int = 8,
                    log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Trains an adapter for the newest checkpoint in target_workdir on the training split of
    `data_config` (default: the embedded corpus, 8 x 256 tokens a batch), saves it to out_dir
    and returns held-out metrics of the plain early exit ("before") and of the adapter
    ("after") on the first `eval_batches` validation batches."""
    from train.checkpoint import restore_model

    target = restore_model(target_workdir)[0]
    return distill_target(target, out_dir, config, data_config=data_config,
                          eval_batches=eval_batches, log=log)


def pretrained_data_config(tokenizer_path: str, config: AdapterTrainConfig, *,
                           seq_len: int = 128, batch_size: int = 8):
    """The embedded corpus tokenized with a real target's own tokenizer (its GGUF file, HF
    folder or packaged name); short rows, since every batch costs a full target forward."""
    from train import data as data_lib

    return data_lib.DataConfig(tokenizer="pretrained", tokenizer_path=tokenizer_path,
                               seq_len=seq_len, batch_size=batch_size, seed=config.seed)


def distill_target(target: Transformer, out_dir: str | os.PathLike, config: AdapterTrainConfig,
                   *, data_config=None, eval_batches: int = 8,
                   log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """distill_workdir for a target already in memory (e.g. an imported SmolLM2, with
    pretrained_data_config for its tokenizer)."""
    from train import data as data_lib

    data_config = data_config or data_lib.DataConfig(seed=config.seed)
    held_out = list(data_lib.eval_batches(data_config, max_batches=eval_batches))
    before = evaluate(EarlyExitAdapter.from_target(target, config.exit_layer), target,
                      held_out)
    adapter = train_adapter(target, data_lib.make_iterator(data_config), config, log=log)
    after = evaluate(adapter, target, held_out)
    save_adapter(adapter, out_dir)
    return {"exit_layer": config.exit_layer, "steps": config.steps, "before": before,
            "after": after}
