"""MSWA: Multi-Scale Window Attention (Xu, Nag, Li, Tian, Barsoum; arXiv 2501.01039) on the
Llama-style core of models/transformer.py.

Every head attends causally to itself and the w_h tokens before it, with w_h varying across the
heads of a layer and across layers: the heads of a layer form len(head_multipliers) equal
groups and the layers (shallow to deep) form len(layer_multipliers) equal groups, and head
group i of layer group j gets window round(m_i * b_j * base_window), at least 1. Windows here
follow the paper (self plus w_h previous tokens); attention.py counts keys including the query
itself, so a head's kernel window is w_h + 1.

Plain sliding-window attention (multipliers all 1, `multiplier_preset="swa"`) and full causal
attention (`base_window=None`) are the same model with one config line changed, so quality
comparisons differ only in the windows. Training runs through Attention's three
implementations (xla_dense, xla_blocked, pallas); decoding keeps a ring-buffer KV cache per
group of kv heads (models/core/ring_cache.py) whose size follows the windows plus
`rewind_margin`, not the context length.
"""
import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from models.core import ring_cache
from models.core.protocol import ModelOutput
from models.core.ring_cache import RingCache
from models.transformer import Transformer, TransformerConfig

# (head multipliers, layer multipliers) by name.
MULTIPLIER_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # The paper's "w/4 to 2w" on both axes: about 0.88 of SWA's window budget.
    "paper": ((0.25, 0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0)),
    # The official fine-tuning code (AMD_MSWA, new_modify_llama.py): the same budget as SWA.
    "official_finetune": ((2.0, 1.0, 0.5, 0.5), (0.5, 0.5, 1.0, 2.0)),
    # Plain sliding-window attention, the baseline MSWA is compared against.
    "swa": ((1.0,), (1.0,)),
}


def _as_multipliers(name: str, value) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r} must be a sequence of numbers; choose named "
                         f"vectors with multiplier_preset, one of {tuple(MULTIPLIER_PRESETS)}")
    out = tuple(float(m) for m in value)  # gin gives lists; configs must stay hashable
    if not out or any(not m > 0 for m in out):
        raise ValueError(f"{name}={tuple(value)} must be a non-empty sequence of positive "
                         "multipliers")
    return out


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MSWAConfig(TransformerConfig):
    """TransformerConfig plus the MSWA windows.

    base_window: the paper's w (self plus w previous tokens); None = full causal attention.
    multiplier_preset: a name in MULTIPLIER_PRESETS giving both multiplier vectors.
    head_multipliers / layer_multipliers: override the preset's vector when set.
    rewind_margin: tokens of history beyond the windows that decoding keeps so speculative
      decoding can rewind (gamma_max).
    The inherited `window` field is unused and must stay None.
    """
    n_layers: int = 4
    base_window: int | None = 64
    multiplier_preset: str = "paper"
    head_multipliers: tuple[float, ...] | None = None
    layer_multipliers: tuple[float, ...] | None = None
    rewind_margin: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.window is not None:
            raise ValueError(f"MSWAConfig sets windows through base_window and the "
                             f"multipliers; window={self.window} must be None")
        if self.multiplier_preset not in MULTIPLIER_PRESETS:
            raise ValueError(f"unknown multiplier_preset {self.multiplier_preset!r}; valid: "
                             f"{tuple(MULTIPLIER_PRESETS)}")
        for name in ("head_multipliers", "layer_multipliers"):
            object.__setattr__(self, name, _as_multipliers(name, getattr(self, name)))
        if self.base_window is not None and self.base_window < 1:
            raise ValueError(f"base_window={self.base_window} is below 1; give a window of "
                             "at least 1 token, or None for full attention")
        if self.rewind_margin < 0:
            raise ValueError(f"rewind_margin={self.rewind_margin} must be at least 0")
        heads, layers = self.resolved_head_multipliers, self.resolved_layer_multipliers
        if self.n_heads % len(heads):
            raise ValueError(f"head_multipliers={heads} has {len(heads)} groups, which do not "
                             f"divide n_heads={self.n_heads}")
        if self.n_layers % len(layers):
            raise ValueError(f"layer_multipliers={layers} has {len(layers)} groups, which do "
                             f"not divide n_layers={self.n_layers}")

    @property
    def resolved_head_multipliers(self) -> tuple[float, ...]:
        return self.head_multipliers or MULTIPLIER_PRESETS[self.multiplier_preset][0]

    @property
    def resolved_layer_multipliers(self) -> tuple[float, ...]:
        return self.layer_multipliers or MULTIPLIER_PRESETS[self.multiplier_preset][1]

    def layer_windows(self) -> tuple[tuple[int | None, ...], ...]:
        """Per layer, per query head: the paper's window (tokens before the query); None for
        full attention."""
        if self.base_window is None:
            return ((None,) * self.n_heads,) * self.n_layers
        heads, layers = self.resolved_head_multipliers, self.resolved_layer_multipliers
        per_head_group = self.n_heads // len(heads)
        per_layer_group = self.n_layers // len(layers)
        # floor(x + 0.5), not round(): Python's round() sends 0.5 to 0 and 2.5 to 2.
        return tuple(
            tuple(max(1, math.floor(heads[h // per_head_group] * layers[l // per_layer_group]
                                    * self.base_window + 0.5))
                  for h in range(self.n_heads))
            for l in range(self.n_layers))

    def kernel_windows(self) -> tuple[tuple[int | None, ...], ...]:
        """layer_windows in attention.py's convention (keys including the query itself)."""
        return tuple(tuple(None if w is None else w + 1 for w in layer)
                     for layer in self.layer_windows())

    def window_budget_ratio(self) -> float:
        """Sum of all heads' windows over plain SWA's n_layers * n_heads * base_window
        (1.0 for SWA; inf for full attention, whose windows are unbounded)."""
        if self.base_window is None:
            return math.inf
        total = sum(sum(layer) for layer in self.layer_windows())
        return total / (self.n_layers * self.n_heads * self.base_window)


class MSWA(Transformer):
    """The Transformer baseline with MSWA's per-layer, per-head windows and a ring-buffer
    decoding cache. Parameters are exactly the baseline's, so weights move between them."""

    def __init__(self, config: MSWAConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MSWAConfig):
            raise ValueError(f"MSWA needs an MSWAConfig, got {type(config).__name__}")
        super().__init__(config, rngs=rngs, block_windows=config.kernel_windows())

    def window_budget_ratio(self) -> float:
        return self.config.window_budget_ratio()

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> ModelOutput:
        out = super().__call__(tokens, segment_ids=segment_ids, positions=positions)
        ratio = self.window_budget_ratio()
        if math.isinf(ratio):
            return out  # full attention has no window budget; an inf scalar would only
                        # pollute the training curves
        return out.replace(metrics={**out.metrics,
                                    "window_budget_ratio": jnp.asarray(ratio, jnp.float32)})

    # -- decoding --------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int) -> RingCache:
        """Empty rings. max_length only bounds positions (and the rings of full-attention
        heads); the windowed heads' memory does not depend on it."""
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size={batch_size} and max_length={max_length} must both "
                             "be at least 1")
        c = self.config
        layers = tuple(
            ring_cache.init_layer(block.attn.windows, c.n_kv_heads, c.resolved_head_dim,
                                  batch_size=batch_size, max_length=max_length,
                                  margin=c.rewind_margin, dtype=c.compute_dtype)
            for block in self.blocks)
        zeros = jnp.zeros((batch_size,), jnp.int32)
        return RingCache(layers=layers, lengths=zeros, rewind_floor=zeros)

    # extend / extend_trunk / extend_from come from Transformer and run through these two
    # hooks. num_tokens (int32 [B], default all S) says how many of the S tokens of each row
    # are real (a ragged prefill, right-padded); the rest are neither stored nor counted,
    # which is how prompts whose lengths differ by more than rewind_margin enter the rings.
    def _extend_blocks(self, x, cache: RingCache, start: int, stop: int, num_tokens):
        b, s = x.shape[:2]
        if num_tokens is None:
            num_tokens = jnp.full((b,), s, jnp.int32)
        num_tokens = jnp.asarray(num_tokens, jnp.int32)
        layers = list(cache.layers)
        for i in range(start, stop):
            block = self.blocks[i]
            h, layers[i] = ring_cache.ring_extend(block.attn, block.attn_norm(x), layers[i],
                                                  cache.lengths, num_tokens)
            x = x + h
            x = x + block.mlp(block.mlp_norm(x))
        return x, cache.replace(layers=tuple(layers)).advance(num_tokens)

    def _read_logits(self, x: jax.Array, cache: RingCache) -> jax.Array:
        """Rows rewound past their rings' history (cache.valid False) get NaN logits, so a
        broken rewind contract can never pass silently."""
        return jnp.where(cache.valid[:, None, None], self.logits(x), jnp.nan)

    def rewind(self, cache: RingCache, lengths: jax.Array) -> RingCache:
        return cache.rewind(lengths)
