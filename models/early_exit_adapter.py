"""Kangaroo's early-exit adapter (arXiv 2404.18911; Equationliu/Kangaroo @4f0949d,
`kangaroo/adapter.py`): the small trained part of the self-speculative draft.

The draft is the target's first `exit_layer` blocks, this adapter, and the target's own
(frozen, shared) output head. The adapter is one pre-norm attention sublayer with its own KV
cache, RMSNorm -> GQA attention (+RoPE) -> residual, and no MLP, followed by its own final
RMSNorm; Kangaroo's is a one-layer `LlamaDecoderLayer` of exactly that shape. It learns to map
the shallow residual stream to something the deep model's head reads like the final layer's
output, so the early exit drafts more of the target's tokens than the head alone would.

Initialisation makes the untrained adapter the plain early exit: the attention's output
projection starts at zero (the sublayer adds nothing) and the final norm starts as a copy of
the target's (`from_target`), so training can only move away from a working draft.
Training (train/adapter_distill.py) distils the target's next-token distribution.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.core.attention import Attention
from models.core.kv_cache import KVCache, LayerKV
from models.core.norms import RMSNorm
from models.transformer import Transformer, TransformerConfig


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """exit_layer: the target block whose output the adapter reads (Kangaroo: 2 of Vicuna-7B's
    32). The widths are the target's, so the adapter's heads match the target's heads."""
    target: TransformerConfig
    exit_layer: int

    def __post_init__(self):
        if not 1 <= self.exit_layer < self.target.n_layers:
            raise ValueError(f"exit_layer={self.exit_layer} must be in [1, "
                             f"{self.target.n_layers - 1}] for a target of "
                             f"{self.target.n_layers} layers (an exit after the last layer "
                             "is the target itself)")


class EarlyExitAdapter(nnx.Module):
    """Attention-only adapter between an early exit and the target's head."""

    def __init__(self, config: AdapterConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config.target
        self.exit_layer = config.exit_layer
        self.vocab_size = c.vocab_size  # the head it reads through is the target's
        self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
        self.attn = Attention(c.d_model, c.n_heads, c.n_kv_heads, c.resolved_head_dim,
                              rope_theta=c.rope_theta, impl=c.attention_impl, out_stddev=0.0,
                              dtype=c.compute_dtype, rngs=rngs)
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)

    @classmethod
    def from_target(cls, target: Transformer, exit_layer: int, *, seed: int = 0
                    ) -> "EarlyExitAdapter":
        """A fresh adapter for `target` that drafts exactly like the plain early exit."""
        adapter = cls(AdapterConfig(target.config, exit_layer), rngs=nnx.Rngs(seed))
        adapter.final_norm.scale[...] = target.final_norm.scale[...]
        return adapter

    def check_target(self, target: Transformer, exit_layer: int) -> None:
        """Raises if this adapter was not built for `target` exiting after `exit_layer`."""
        c, t = self.config.target, target.config
        if (c.d_model, c.n_heads, c.n_kv_heads, c.vocab_size) != (
                t.d_model, t.n_heads, t.n_kv_heads, t.vocab_size):
            raise ValueError(
                f"adapter widths (d_model, n_heads, n_kv_heads, vocab_size) = "
                f"{(c.d_model, c.n_heads, c.n_kv_heads, c.vocab_size)} do not match the "
                f"target's {(t.d_model, t.n_heads, t.n_kv_heads, t.vocab_size)}")
        if exit_layer != self.exit_layer:
            raise ValueError(f"the adapter was trained on exit_layer={self.exit_layer}, but "
                             f"the sampler exits at exit_layer={exit_layer}")

    # -- training --------------------------------------------------------------------------
    def __call__(self, hidden: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Normalised states [B, T, d] for the target's head, from exit states [B, T, d]."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(hidden.shape[1], dtype=jnp.int32),
                                         hidden.shape[:2])
        x = hidden + self.attn(self.attn_norm(hidden), positions, segment_ids)
        return self.final_norm(x)

    def logits(self, hidden: jax.Array, target: Transformer, *,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
        """Draft logits f32[B, T, V] for exit states, read through the target's head."""
        return target.project_to_vocab(self(hidden, segment_ids=segment_ids,
                                            positions=positions))

    # -- decoding --------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        c = self.config.target
        layer = LayerKV.zeros(batch_size, max_length, c.n_kv_heads, c.resolved_head_dim,
                              c.compute_dtype)
        return KVCache(layers=(layer,), lengths=jnp.zeros((batch_size,), jnp.int32))

    def extend(self, hidden: jax.Array, cache: KVCache, target: Transformer, *,
               num_tokens: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Appends exit states hidden [B, S, d] at each row's length; returns draft logits
        f32[B, S, V] through the target's head."""
        h, kv = self.attn.extend(self.attn_norm(hidden), cache.layers[0], cache.lengths)
        added = hidden.shape[1] if num_tokens is None else jnp.asarray(num_tokens, jnp.int32)
        logits = target.project_to_vocab(self.final_norm(hidden + h))
        return logits, KVCache(layers=(kv,), lengths=cache.lengths + added)

    def rewind(self, cache: KVCache, lengths: jax.Array) -> KVCache:
        return cache.rewind(lengths)
