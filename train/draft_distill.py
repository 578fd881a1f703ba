"""Distils a small draft Transformer for a real target (speculative decoding, Leviathan et al.,
arXiv 2211.17192; Chen et al., arXiv 2302.01318), sharing the target's tokenizer and vocabulary.

A useful draft has to agree with the target's greedy choice often while costing a fraction
of a target step. Training one from scratch for a 49152-token vocabulary does not fit a CPU
half hour, so the draft starts as a layer-dropped copy of the target (DistilBERT-style
initialisation): its embedding table and tied head, final norm and `keep_layers` of its
blocks. Only the kept blocks and the final norm then learn, by KL(p_target || q_draft) on
every real token; the (tied) embedding stays frozen, which halves the backward's head cost
and keeps the draft's vocabulary geometry the target's. Teacher logits are computed on the
fly inside the same jitted step (a target forward per batch; sequences are kept short).

Data: the embedded corpus (train/data.py, tokenized with the target's own tokenizer) plus,
every `chat_every`-th batch, chat-formatted rows (train/draft_data.py) made from
training-split code, so the draft also sees the turn markers an instruct target answers after.

    draft, summary = distill(target, tokenizer, config, workdir=DIR)   # resumable in chunks
    evaluate(draft, target, batches) -> {"kl", "top1_agreement", "prob_acc"}

The draft is saved as a normal checkpoint (train.checkpoint.restore_model loads it, so
`experiments.generate --draft_workdir=DIR` does) and, by experiments/train_draft.py, as a GGUF
file with the target's vocabulary so HF's assisted generation can use the same weights.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.transformer import Transformer
from train import checkpoint, draft_data, optim

Batch = dict[str, np.ndarray]
SUMMARY_FILE = "draft.json"
MODEL_NAME = "transformer"


@dataclasses.dataclass(frozen=True)
class DraftTrainConfig:
    """keep_layers: the target blocks the draft starts from (in order); steps: total
    optimizer steps of the whole (possibly resumed) run."""
    keep_layers: tuple[int, ...] = (0, 10, 20, 29)  # best start of 5 tried (held-out KL)
    steps: int = 300
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    seq_len: int = 128
    batch_size: int = 8
    chat_every: int = 4
    save_every: int = 25
    seed: int = 0

    def __post_init__(self):
        if not self.keep_layers:
            raise ValueError("keep_layers=() must name at least one target block")
        if list(self.keep_layers) != sorted(set(self.keep_layers)) or self.keep_layers[0] < 0:
            raise ValueError(f"keep_layers={self.keep_layers} must be increasing, distinct, "
                             ">= 0")
        for name in ("steps", "seq_len", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.chat_every < 0:
            raise ValueError(f"chat_every={self.chat_every} must be >= 0 (0: no chat rows)")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")


def draft_from_target(target: Transformer, keep_layers: tuple[int, ...]) -> Transformer:
    """A Transformer with the target's config but len(keep_layers) blocks, initialised with the
    target's embedding (and head), final norm and the kept blocks (copies, not shared)."""
    n = target.config.n_layers
    if any(not 0 <= i < n for i in keep_layers):
        raise ValueError(f"keep_layers={keep_layers} must be in [0, {n}) for this target")
    config = dataclasses.replace(target.config, n_layers=len(keep_layers))
    draft = Transformer(config, rngs=nnx.Rngs(0))
    copy = lambda module: jax.tree.map(jnp.array, nnx.state(module, nnx.Param))  # noqa: E731
    nnx.update(draft.embed, copy(target.embed))
    nnx.update(draft.final_norm, copy(target.final_norm))
    if not config.tie_embeddings:
        draft.lm_head[...] = jnp.array(target.lm_head[...])
    for j, i in enumerate(keep_layers):
        nnx.update(draft.blocks[j], copy(target.blocks[i]))
    return draft


def kl_terms(draft: Transformer, target: Transformer, batch: dict[str, jax.Array]
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(summed KL(target || draft) over real tokens, summed metrics); target is a constant."""
    kwargs = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    p_log = jax.lax.stop_gradient(jax.nn.log_softmax(target(batch["inputs"], **kwargs).logits))
    q_log = jax.nn.log_softmax(draft(batch["inputs"], **kwargs).logits)
    p = jnp.exp(p_log)
    mask = batch["loss_mask"].astype(jnp.float32)
    kl = jnp.sum(p * (p_log - q_log), axis=-1)
    top1 = (jnp.argmax(q_log, -1) == jnp.argmax(p_log, -1)).astype(jnp.float32)
    prob_acc = jnp.sum(jnp.minimum(p, jnp.exp(q_log)), axis=-1)
    metrics = {"kl": jnp.sum(kl * mask), "top1_agreement": jnp.sum(top1 * mask),
               "prob_acc": jnp.sum(prob_acc * mask), "tokens": jnp.sum(mask)}
    return metrics["kl"], metrics


_eval_terms = nnx.jit(kl_terms)
_KEYS = ("inputs", "segment_ids", "positions", "loss_mask")


def _device(batch: Batch) -> dict[str, jax.Array]:
    return {k: jnp.asarray(batch[k]) for k in _KEYS}


def evaluate(draft: Transformer, target: Transformer, batches: Iterable[Batch]
             ) -> dict[str, float]:
    """Per real token: KL(target || draft), top-1 agreement (the greedy acceptance rate of one
    draft token) and prob_acc = sum min(p, q) (speculative sampling's acceptance rate)."""
    totals: dict[str, float] = {}
    for batch in batches:
        _, metrics = _eval_terms(draft, target, _device(batch))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    tokens = max(totals.pop("tokens", 0.0), 1.0)
    return {k: round(v / tokens, 4) for k, v in totals.items()}


# ----------------------------------------------------------------------------- training

def _trainable():
    # The tied embedding (and any untied head) stays the target's; blocks and norm learn.
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed")),
                   nnx.Not(nnx.PathContains("lm_head")))


@functools.lru_cache(maxsize=8)
def _transform(lr: float, steps: int, warmup_steps: int, weight_decay: float):
    """The optax transformation of a config, one object per distinct config: the optimizer
    holds it as static graph data, so a fresh one per call would recompile the train step."""
    schedule = optim.make_schedule(lr=lr, steps=steps, warmup_steps=min(warmup_steps, steps))
    return optim.make_optimizer(schedule, weight_decay=weight_decay)


@nnx.jit
def train_step(draft, optimizer, target, batch):
    """One optimizer step of KL(target || draft) on the trainable part (module level, so a
    resumed run or a second distill() of the same shapes reuses the compiled step)."""
    def loss_fn(draft):
        loss, metrics = kl_terms(draft, target, batch)
        return loss / jnp.maximum(metrics["tokens"], 1.0), metrics
    diff = nnx.DiffState(0, _trainable())
    (loss, metrics), grads = nnx.value_and_grad(loss_fn, argnums=diff, has_aux=True)(draft)
    optimizer.update(draft, grads)
    return loss, metrics


def distill(target: Transformer, batches: Iterator[Batch], config: DraftTrainConfig,
            workdir: str | os.PathLike, *, max_new_steps: int | None = None,
            log: Callable[[dict[str, Any]], None] | None = None) -> tuple[Transformer, int]:
    """Trains (or resumes from workdir's newest checkpoint) a draft for `target` up to
    config.steps, at most max_new_steps more in this call; saves every config.save_every
    steps and at the end. Returns (draft, steps done). After a resume the batches continue
    from wherever `batches` starts (callers reseed by step)."""
    draft = draft_from_target(target, config.keep_layers)
    optimizer = nnx.Optimizer(draft, _transform(config.lr, config.steps, config.warmup_steps,
                                                config.weight_decay), wrt=_trainable())
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2, async_save=False)
    step = 0
    try:
        if ckpt.steps():
            params = nnx.state(draft, nnx.Param)
            opt_state = nnx.state(optimizer, nnx.optimizer.OptState)
            restored = ckpt.restore(params, opt_state)
            nnx.update(draft, restored.params)
            nnx.update(optimizer, restored.opt_state)
            step = restored.step
        stop = config.steps if max_new_steps is None else min(config.steps,
                                                              step + max_new_steps)
        start = time.perf_counter()
        while step < stop:
            loss, metrics = train_step(draft, optimizer, target, _device(next(batches)))
            step += 1
            if not np.isfinite(float(loss)):
                raise FloatingPointError(f"draft distillation KL is {float(loss)} at step "
                                         f"{step}; lower lr={config.lr}")
            if log is not None and (step % 10 == 0 or step == stop):
                tokens = max(float(metrics["tokens"]), 1.0)
                log({"step": step, "kl": float(loss),
                     "top1_agreement": float(metrics["top1_agreement"]) / tokens,
                     "seconds": round(time.perf_counter() - start, 1)})
            if step % config.save_every == 0 or step == stop:
                ckpt.save(step, nnx.state(draft, nnx.Param),
                          nnx.state(optimizer, nnx.optimizer.OptState), None,
                          model_name=MODEL_NAME, model_config=draft.config,
                          extra={"draft": dataclasses.asdict(config)})
        ckpt.wait()
    finally:
        ckpt.close()
    return draft, step


def write_summary(workdir: str | os.PathLike, summary: dict[str, Any]) -> None:
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)


def read_summary(workdir: str | os.PathLike) -> dict[str, Any] | None:
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- the whole run

def vocab_from_gguf(path: str):
    """The tokenizer part of a GGUF file as a models.convert_gguf.GGUFVocab, so a draft saved
    with it tokenizes exactly like its target (HF and llama.cpp read the file's vocabulary)."""
    from models import convert_gguf

    fields = convert_gguf.open_gguf(path).fields

    def get(key, default=None):
        return fields[key].contents() if key in fields else default

    return convert_gguf.GGUFVocab(
        model=get("tokenizer.ggml.model"), tokens=get("tokenizer.ggml.tokens"),
        token_types=get("tokenizer.ggml.token_type"),
        bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
        pad_id=get("tokenizer.ggml.padding_token_id"),
        unk_id=get("tokenizer.ggml.unknown_token_id"), pre=get("tokenizer.ggml.pre"),
        merges=get("tokenizer.ggml.merges") or (), scores=get("tokenizer.ggml.scores"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
        add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", False)),
        chat_template=get("tokenizer.chat_template"))


def run(workdir: str | os.PathLike, config: DraftTrainConfig, target: Transformer, tokenizer,
        *, target_gguf: str, max_new_steps: int | None = None, eval_batches: int = 4,
        log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Distils (or resumes) a draft of `target` in workdir. target_gguf: the target's GGUF
    file (its tokenizer for the corpus, its vocabulary for the draft's GGUF). Held-out metrics
    of the untrained layer-dropped draft are measured once ("before"); when the run reaches
    config.steps, the trained draft's ("after") are added and DIR/draft.gguf is written.
    Returns the summary (also in DIR/draft.json)."""
    from models import convert_gguf
    from train import data as data_lib

    os.makedirs(workdir, exist_ok=True)
    data_config = data_lib.DataConfig(tokenizer="pretrained", tokenizer_path=target_gguf,
                                      seq_len=config.seq_len, batch_size=config.batch_size,
                                      seed=config.seed)
    held_out = list(data_lib.eval_batches(data_config, max_batches=eval_batches))
    summary = read_summary(workdir) or {}
    if "before" not in summary:
        summary = {"keep_layers": list(config.keep_layers), "steps": config.steps,
                   "target": os.path.basename(target_gguf),
                   "before": evaluate(draft_from_target(target, config.keep_layers), target,
                                      held_out)}
        write_summary(workdir, summary)
        if log is not None:
            log({"before": summary["before"]})
    # A resumed call reseeds the data by its starting step, so it does not replay batches.
    done = max(checkpoint.Checkpointer(workdir, read_only=False, async_save=False).steps()
               or [0])
    corpus_iter = data_lib.make_iterator(dataclasses.replace(data_config,
                                                             seed=config.seed + done))
    chat = (draft_data.chat_batches(tokenizer, seed=config.seed + done,
                                    batch_size=config.batch_size, seq_len=config.seq_len)
            if config.chat_every else None)
    batches = draft_data.mixed_batches(corpus_iter, chat, config.chat_every)
    draft, step = distill(target, batches, config, workdir, max_new_steps=max_new_steps,
                          log=log)
    summary["steps_done"] = step
    if step >= config.steps:
        summary["after"] = evaluate(draft, target, held_out)
        summary["gguf"] = os.path.join(os.path.abspath(workdir), "draft.gguf")
        summary["draft_params"] = draft.num_params()
        convert_gguf.save_gguf(draft, summary["gguf"], vocab=vocab_from_gguf(target_gguf),
                               name=f"swiftlm-draft-{len(config.keep_layers)}l")
    write_summary(workdir, summary)
    return summary


def add_acceptance_head(workdir: str | os.PathLike, target: Transformer, target_gguf: str, *,
                        steps: int, labels: str = "greedy", seq_len: int = 128,
                        batch_size: int = 8, seed: int = 0,
                        log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Trains SpecDec++'s acceptance head (arXiv 2405.19715; train/acceptance_distill.py) on
    the finished draft in workdir against `target`, on the same corpus, and saves it to
    DIR/acceptance_head, where the bench and `experiments.generate --sampler=specdecpp*`
    look. Returns held-out head metrics."""
    from train import acceptance_distill as acc
    from train import data as data_lib
    from train.checkpoint import restore_model

    draft = restore_model(workdir)[0]
    data_config = data_lib.DataConfig(tokenizer="pretrained", tokenizer_path=target_gguf,
                                      seq_len=seq_len, batch_size=batch_size, seed=seed + 1)
    config = acc.HeadTrainConfig(labels=labels, steps=steps, seed=seed)
    model = acc.train_head(target, draft, data_lib.make_iterator(data_config), config,
                           log=log, log_every=10)
    held_out = list(data_lib.eval_batches(data_config, max_batches=2))
    metrics = acc.evaluate(target, model, held_out, config)
    acc.save_head(model, os.path.join(workdir, "acceptance_head"), config)
    summary = read_summary(workdir) or {}
    summary["acceptance_head"] = {"steps": steps, "labels": labels, **metrics}
    write_summary(workdir, summary)
    return summary["acceptance_head"]
