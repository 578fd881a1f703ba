"""Tiny models and reference decoders shared by the decoding tests.

Models are built once per process (functools.cache): every construction and every distinct
sampler compiles, and compilation dominates these tests' time on CPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import registry
from models.transformer import Transformer, TransformerConfig

VOCAB = 64
EOS = VOCAB - 1
# A ragged batch (lengths 5, 10, 1, 13: one prompt bucket) shared by the loop and speculative
# tests, so that samplers compiled for one test are reused by the next in the same process.
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 7, 8, 9, 7, 8, 9, 7], [3], list(range(40, 53))]
MAX_NEW = 16


def config(vocab: int = VOCAB) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def model(seed: int = 0, vocab: int = VOCAB, head_scale: float = 1.0) -> Transformer:
    """A random tiny Transformer; head_scale multiplies its output head, which sharpens its
    distributions (random init gives near-uniform ones) without changing its argmax."""
    # One cache key per model however the arguments are spelled (model() is model(0)).
    return _model(int(seed), int(vocab), float(head_scale))


@functools.cache
def _model(seed: int, vocab: int, head_scale: float) -> Transformer:
    if head_scale == 1.0:
        return registry.construct(Transformer, config(vocab), seed=seed)
    # A scaled copy of the base model, edited on the host: eager jax ops would each compile.
    graph, state = nnx.split(model(seed, vocab))
    m = nnx.merge(graph, jax.tree.map(lambda x: jnp.asarray(np.array(x)), state))
    m.lm_head[...] = jnp.asarray(np.asarray(m.lm_head[...]) * np.float32(head_scale))
    return m


@functools.cache
def noisy_copy(seed: int = 0, noise: float = 0.3, noise_seed: int = 1) -> Transformer:
    """model(seed) with Gaussian noise (noise x each weight's std) on every weight: a draft
    that agrees with the target's argmax often but not always, differently per row."""
    return _noisy_copy(int(seed), float(noise), int(noise_seed))


@functools.cache
def _noisy_copy(seed: int, noise: float, noise_seed: int) -> Transformer:
    return perturbed(model(seed), noise, noise_seed, relative=True)


def perturbed(module: nnx.Module, noise: float, seed: int, *, relative: bool = False):
    """A copy of `module` with Gaussian noise on every weight: `noise` times each weight's
    std when relative, else absolute. Edited on the host (eager jax ops would each compile)."""
    graph, state = nnx.split(module)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    noisy = []
    for x in leaves:
        x = np.asarray(x)
        scale = np.float32(noise) * (x.std() if relative else np.float32(1.0))
        noisy.append(jnp.asarray(x + scale * rng.standard_normal(x.shape).astype(x.dtype)))
    return nnx.merge(graph, jax.tree.unflatten(tree, noisy))


_forward = nnx.jit(lambda m, tokens: m(tokens).logits)


def next_token_logits(m, sequences: list[list[int]], width: int = 32) -> np.ndarray:
    """f32[N, V]: a full (uncached) forward's logits after each sequence (rows padded to a
    power of two, so few batch shapes compile)."""
    tokens = np.zeros((max(4, 1 << (len(sequences) - 1).bit_length()), width), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)] = s
    logits = np.asarray(_forward(m, jnp.asarray(tokens)))
    return np.stack([logits[i, len(s) - 1] for i, s in enumerate(sequences)])


def reference_greedy(m, prompts: list[list[int]], max_new_tokens: int,
                     eos_id: int | None = None, width: int = 32) -> list[list[int]]:
    """Greedy decoding by full forward passes over the growing sequences: no cache, no loop."""
    seqs = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    live = [True] * len(prompts)
    for _ in range(max_new_tokens):
        tokens = np.asarray(next_token_logits(m, seqs, width)).argmax(-1)
        for b, t in enumerate(tokens):
            if live[b]:
                seqs[b].append(int(t))
                outs[b].append(int(t))
                live[b] = eos_id is None or int(t) != eos_id
    return outs


def adapter(target: Transformer, exit_layer: int = 1, noise: float = 0.1, seed: int = 3):
    """An early-exit adapter for `target` with random weights on top of its (plain-exit)
    initialisation, standing in for a trained one."""
    from models.early_exit_adapter import EarlyExitAdapter
    return perturbed(EarlyExitAdapter.from_target(target, exit_layer), noise, seed)
