"""A masked diffusion language model (LLaDA, Nie et al. 2025, arXiv 2502.09992) on the shared core.

The network is the Llama-style stack of models/transformer.py (RMSNorm, GQA attention with RoPE,
SwiGLU) with the causal mask removed: every position sees every other position of its own
document (packed documents still never attend across segments, and segment 0, padding, sees
only padding). There is no timestep input; the model reads the masking level from the number
of MASK tokens, as LLaDA does.

Training objective (ML-GSAI/LLaDA `GUIDELINES.md`, spec decoding.md section 4.1): per row draw
t ~ U(0, 1), mask each scored token independently with probability p = (1 - eps) t + eps, and
score the masked ones with cross-entropy weighted 1/p. `training_loss` returns the summed
weighted CE; the trainer divides by the scored-token count, which is LLaDA's B*L
normalisation for full pretraining rows and its per-answer-token normalisation for SFT rows.
SFT is not a flag: tokens whose loss_mask is 0 inside a document (the prompt of a task example,
see train/synthetic_tasks.py) are never masked and never scored, so the same loss covers
pretraining rows (loss_mask 1 on every real token) and SFT rows. `mc_log_likelihood` is LLaDA's
lower-variance Monte-Carlo estimate of log p(answer | prompt) (`get_log_likelihood.py`: mask
exactly l ~ U{1..L} answer tokens, weight L / l).

What the samplers' approximate block caches need (Fast-dLLM, arXiv 2505.22618; used by
decoding/diffusion/cache.py): `forward_with_kv` runs the full bidirectional forward and returns
every layer's keys and values over the whole buffer; `window_forward` runs only a window of
query positions per row (the current block for the dual cache; the block and everything after
it for the prefix cache), writes the window's fresh keys and values into a copy of that cache
and attends over all valid keys. Keys outside the window are the stale ones of the last full
forward: that is the approximation, exact only when they did not change.
"""
from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.core.attention import masked_attention
from models.core.embedding import Embedding
from models.core.norms import RMSNorm
from models.core.params import param
from models.core.protocol import ModelOutput
from models.transformer import DTYPES, Block, TransformerConfig

LAYER_KV = tuple[jax.Array, jax.Array]  # keys, values [B, L, kv_heads, head_dim]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The Transformer's fields (bidirectional attention, dense only) plus the diffusion ones.

    mask_token_id: the [MASK] id (the byte tokenizer's mask_id, 259, by default).
    mask_eps: the floor eps of the masking probability p = (1 - eps) t + eps (LLaDA: 1e-3).
    """
    vocab_size: int = 260
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    mlp_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"
    mask_token_id: int = 259
    mask_eps: float = 1e-3

    def __post_init__(self):
        self.as_transformer()  # validates the shared fields
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id} must be a token id in "
                             f"[0, {self.vocab_size})")
        if not 0.0 < self.mask_eps < 1.0:
            raise ValueError(f"mask_eps={self.mask_eps} must be in (0, 1)")

    def as_transformer(self) -> TransformerConfig:
        fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        return TransformerConfig(**{k: v for k, v in dataclasses.asdict(self).items()
                                    if k in fields})


def _attention_mask(segment_ids: jax.Array, key_segments: jax.Array | None = None) -> jax.Array:
    """Bidirectional visibility [B, 1, S, K]: same segment (0 = padding sees only padding)."""
    keys = segment_ids if key_segments is None else key_segments
    return (segment_ids[:, :, None] == keys[:, None, :])[:, None]


class DiffusionLM(nnx.Module):
    """Bidirectional Transformer predicting the clean token at every position."""

    def __init__(self, config: DiffusionConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config.as_transformer()
        self.vocab_size = c.vocab_size
        self.mask_token_id = config.mask_token_id
        self.embed = Embedding(c.vocab_size, c.d_model, dtype=c.compute_dtype, rngs=rngs)
        self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.n_layers)])
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
        if not c.tie_embeddings:
            self.lm_head = param(rngs, (c.d_model, c.vocab_size), ("embed", "vocab"))

    # -- forward ---------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> ModelOutput:
        logits, _ = self.forward_with_kv(tokens, segment_ids=segment_ids, positions=positions)
        return ModelOutput(logits=logits, aux_loss=jnp.zeros((), jnp.float32), metrics={})

    def forward_with_kv(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                        positions: jax.Array | None = None
                        ) -> tuple[jax.Array, tuple[LAYER_KV, ...]]:
        """Logits [B, L, V] and every layer's (keys, values) [B, L, kv_heads, head_dim]."""
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                         tokens.shape)
        mask = _attention_mask(segment_ids)
        x = self.embed(tokens)
        kvs = []
        for block in self.blocks:
            q, k, v = block.attn.project(block.attn_norm(x), positions)
            kvs.append((k, v))
            x = self._finish_block(block, x, q, k, v, mask)
        return self._logits(x), tuple(kvs)

    def init_cache(self, batch_size: int, max_length: int) -> tuple[LAYER_KV, ...]:
        """Zero keys and values of every layer over a buffer of max_length positions: the
        block cache's layout (filled by forward_with_kv, updated by window_forward). There is
        no `extend`: a diffusion model is not decoded token by token."""
        c = self.config.as_transformer()
        shape = (batch_size, max_length, c.n_kv_heads, c.resolved_head_dim)
        return tuple((jnp.zeros(shape, c.compute_dtype), jnp.zeros(shape, c.compute_dtype))
                     for _ in range(c.n_layers))

    def window_forward(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array,
                       kv: tuple[LAYER_KV, ...], key_valid: jax.Array
                       ) -> tuple[jax.Array, tuple[LAYER_KV, ...]]:
        """Logits [B, W, V] of a window of query tokens [B, W] at buffer positions [B, W].

        valid: bool[B, W], window slots that are real (their keys and values replace the
        cached ones at `positions`; the others are dropped). kv: a cache from
        `forward_with_kv` over the buffer; key_valid: bool[B, L], the buffer's real
        positions. Returns the window's logits and the cache with the window's fresh entries.
        """
        length = kv[0][0].shape[1]
        rows = jnp.arange(tokens.shape[0])[:, None]
        slots = jnp.where(valid, positions, length)  # out of range: dropped by the scatter
        mask = (valid[:, :, None] & key_valid[:, None, :])[:, None]
        x = self.embed(tokens)
        new_kv = []
        for block, (k_cache, v_cache) in zip(self.blocks, kv):
            q, k, v = block.attn.project(block.attn_norm(x), positions)
            k_all = k_cache.at[rows, slots].set(k.astype(k_cache.dtype), mode="drop")
            v_all = v_cache.at[rows, slots].set(v.astype(v_cache.dtype), mode="drop")
            new_kv.append((k_all, v_all))
            x = self._finish_block(block, x, q, k_all, v_all, mask)
        return self._logits(x), tuple(new_kv)

    def _finish_block(self, block: Block, x, q, k, v, mask):
        attn = masked_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        x = x + block.attn.output(attn)
        return x + block.mlp(block.mlp_norm(x))

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        if self.config.tie_embeddings:
            out = self.embed.attend(x)
        else:
            dtype = DTYPES[self.config.dtype]
            out = x.astype(dtype) @ self.lm_head[...].astype(dtype)
        return out.astype(jnp.float32)

    # -- training --------------------------------------------------------------------------
    def mask_batch(self, batch: dict, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """LLaDA's forward process on a batch: (noised inputs, masked bool[B, T], p_mask [B]).

        Only scored tokens (loss_mask 1) can be masked; a document's unscored tokens (the
        prompt of an SFT example) stay visible, padding stays padding.
        """
        tokens = batch["inputs"]
        key_t, key_m = jax.random.split(rng)
        t = jax.random.uniform(key_t, (tokens.shape[0],))
        eps = self.config.mask_eps
        p_mask = (1.0 - eps) * t + eps
        draw = jax.random.uniform(key_m, tokens.shape)
        masked = (draw < p_mask[:, None]) & (batch["loss_mask"] > 0)
        noised = jnp.where(masked, self.mask_token_id, tokens)
        return noised, masked, p_mask

    def training_loss(self, batch: dict, rng: jax.Array
                      ) -> tuple[jax.Array, jax.Array, dict]:
        """(summed 1/p-weighted CE over masked tokens, aux loss 0, metrics): the trainer's
        model-provided loss (train/trainer.py divides by the scored-token count)."""
        noised, masked, p_mask = self.mask_batch(batch, rng)
        logits = self(noised, segment_ids=batch["segment_ids"],
                      positions=batch["positions"]).logits
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["inputs"])
        weighted = jnp.where(masked, ce / p_mask[:, None], 0.0)
        n_masked = jnp.sum(masked)
        metrics = {"masked_fraction": n_masked / jnp.maximum(jnp.sum(batch["loss_mask"]), 1),
                   "masked_ce": jnp.sum(jnp.where(masked, ce, 0.0)) / jnp.maximum(n_masked, 1)}
        return jnp.sum(weighted), jnp.zeros((), jnp.float32), metrics

    def mc_log_likelihood(self, tokens: jax.Array, answer_mask: jax.Array, rng: jax.Array, *,
                          mc_num: int = 128, segment_ids: jax.Array | None = None
                          ) -> jax.Array:
        """LLaDA's Monte-Carlo estimate of log p(answer | prompt) per row, f32[B].

        tokens [B, T]: prompt and answer; answer_mask bool[B, T]: the answer positions. Each
        of mc_num draws masks exactly l ~ U{1..n} of a row's n answer tokens (uniformly
        chosen) and adds n / l times their summed log-likelihood; the estimate is the mean
        (a lower bound in expectation, as the ELBO is).
        """
        answer_mask = answer_mask.astype(bool)
        n = jnp.sum(answer_mask, axis=1)

        def one(key):
            key_l, key_p = jax.random.split(key)
            l = jax.random.randint(key_l, n.shape, 1, jnp.maximum(n, 1) + 1)
            # Rank the answer positions by a random score: the l lowest ranks are masked.
            score = jnp.where(answer_mask, jax.random.uniform(key_p, tokens.shape), 2.0)
            rank = jnp.argsort(jnp.argsort(score, axis=1), axis=1)
            masked = answer_mask & (rank < l[:, None])
            noised = jnp.where(masked, self.mask_token_id, tokens)
            logits = self(noised, segment_ids=segment_ids).logits
            ll = -optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
            return jnp.sum(jnp.where(masked, ll, 0.0), axis=1) * n / l

        return jnp.mean(jax.lax.map(one, jax.random.split(rng, mc_num)), axis=0)

    # -- bookkeeping -----------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

