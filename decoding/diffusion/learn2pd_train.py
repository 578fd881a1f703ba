"""Training Learn2PD's filter (arXiv 2509.25188; ims-kdks/Learning-to-Parallel-Decoding
@342293c `llada/generate_training_data.py`, `train.ipynb`; spec decoding.md section 4.6) post
hoc on a masked diffusion model's own confidences; the filter and its commit rule are
learn2pd.py.

"Extremely Greedy Parallel" oracle: decode prompts with the one-token-per-step baseline to get
the reference y*, re-decode committing at every step exactly the masked block positions whose
argmax already equals y*, and log (block confidences, argmax == y*) per step. Then fit the
filter with BCE (AdamW, full batch, 80/10/10 split; the official code: lr 3e-3, 40k epochs;
fewer suffice for this tiny data). Two deviations, both for fixed-shape jitted steps: when no
masked position matches y*, the oracle commits y* at the most confident one (the official code
fills the whole block with y* once the predictions stop changing); and y* past the baseline's
first end-of-sequence token is taken to be end-of-sequence padding (what `generate` returns
stops there).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from decoding.diffusion import cache, remasking
from decoding.diffusion.base import layout
from decoding.diffusion.learn2pd import Filter, block_confidences, filter_logits


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _oracle_step(graph, weights, tokens, reference, prompt_lengths, limits, mask_id: int,
                 block_length: int):
    model = nnx.merge(graph, weights)
    lay = layout(tokens, prompt_lengths, limits, mask_id, block_length)
    x0, conf, _ = cache.full_predict(model, tokens, lay.key_valid)
    candidates = lay.masked & lay.in_block
    correct = x0 == reference
    commit = candidates & correct
    stuck = ~jnp.any(commit, axis=1)
    fallback = remasking.topk_commit(conf, candidates, jnp.ones(tokens.shape[:1], jnp.int32))
    commit = jnp.where(stuck[:, None], fallback, commit)
    active = jnp.any(lay.masked, axis=1)
    conf_block, pos = block_confidences(conf, lay.block_start, block_length)
    label = jnp.take_along_axis(correct, jnp.minimum(pos, tokens.shape[1] - 1), axis=1)
    return jnp.where(commit, reference, tokens), conf_block, label, active


def oracle_data(model, prompts: list[list[int]], reference: list[list[int]], gen_length: int,
                block_length: int, eos_id: int, pad_id: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(confidences f32[N, BL], labels bool[N, BL]): one sample per step and active prompt of
    the oracle decode towards `reference` (the baseline's generated ids of each prompt)."""
    graph, weights = nnx.split(model)
    mask_id = int(model.mask_token_id)
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max()) + gen_length
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    ref = np.full_like(tokens, eos_id)
    for b, (p, r) in enumerate(zip(prompts, reference)):
        tokens[b, :len(p)] = p
        tokens[b, len(p):len(p) + gen_length] = mask_id
        ref[b, :len(p)] = p
        r = list(r)[:gen_length]
        ref[b, len(p):len(p) + len(r)] = r
    limits = lengths + gen_length
    tokens, ref = jnp.asarray(tokens), jnp.asarray(ref)
    confs, labels = [], []
    for _ in range(gen_length):
        tokens, conf, label, active = _oracle_step(graph, weights, tokens, ref,
                                                   jnp.asarray(lengths), jnp.asarray(limits),
                                                   mask_id, block_length)
        active = np.asarray(active)
        if not active.any():
            break
        confs.append(np.asarray(conf)[active])
        labels.append(np.asarray(label)[active])
    return np.concatenate(confs), np.concatenate(labels)


def init_params(block_length: int, hidden: int, key: jax.Array) -> dict:
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (block_length, hidden)) / np.sqrt(block_length),
            "b1": jnp.zeros((hidden,)),
            "w2": jax.random.normal(k2, (hidden, block_length)) / np.sqrt(hidden),
            "b2": jnp.zeros((block_length,))}


def _bce(params, conf, labels):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(filter_logits(params, conf), labels))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _fit(params, conf, labels, steps: int, lr: float):
    opt = optax.adamw(lr)

    def one(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(_bce)(params, conf, labels)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(one, (params, opt.init(params)), None, length=steps)
    return params, losses


def train_filter(conf: np.ndarray, labels: np.ndarray, *, hidden: int = 32, steps: int = 2000,
                 lr: float = 3e-3, threshold: float = 0.96, seed: int = 0
                 ) -> tuple[Filter, dict]:
    """(filter, metrics): full-batch BCE on an 80/10/10 split of the oracle samples; metrics
    on the held-out 10% (test): loss, accuracy, and at `threshold` the precision (accepted
    positions that are final) and recall of the positions the filter would accept."""
    if conf.ndim != 2 or conf.shape != labels.shape or len(conf) < 10:
        raise ValueError(f"need >= 10 samples of [N, block_length]; got conf {conf.shape}, "
                         f"labels {labels.shape}")
    order = np.random.default_rng(seed).permutation(len(conf))
    n_train, n_val = int(0.8 * len(conf)), int(0.1 * len(conf))
    split = {"train": order[:n_train], "validation": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    data = {k: (jnp.asarray(conf[i], jnp.float32), jnp.asarray(labels[i], jnp.float32))
            for k, i in split.items()}
    params = init_params(conf.shape[1], hidden, jax.random.key(seed))
    params, losses = _fit(params, *data["train"], steps, lr)
    metrics = {"samples": int(len(conf)), "train_loss": float(losses[-1])}
    for name in ("validation", "test"):
        c, y = data[name]
        prob = jax.nn.sigmoid(filter_logits(params, c))
        take = prob > threshold
        metrics[f"{name}_loss"] = float(_bce(params, c, y))
        metrics[f"{name}_accuracy"] = float(jnp.mean((prob > 0.5) == (y > 0.5)))
        metrics[f"{name}_precision"] = float(jnp.sum(take & (y > 0.5)) / jnp.maximum(
            jnp.sum(take), 1))
        metrics[f"{name}_recall"] = float(jnp.sum(take & (y > 0.5)) / jnp.maximum(
            jnp.sum(y > 0.5), 1))
    return Filter.from_params(params), metrics
