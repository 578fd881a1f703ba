"""SpecDec++'s acceptance-prediction head and the draft that carries it (arXiv 2405.19715;
Kaffaljidhmah2/SpecDec_pp @937aee2, `specdec_pp/wrap_model.py`).

The head reads the draft model's last hidden state (after its final norm, which is what HF's
`hidden_states[-1]` is for a Llama) at a drafted token and predicts the probability that the
target will accept that token. It is the official `AcceptancePredictionHead`:
`num_layers` residual blocks `x + SiLU(W x + b)` and a final `Linear(d, 2)` whose softmax's
second entry is the acceptance probability. (The official code builds its blocks as
`[ResBlock(h)] * num_layers`, i.e. one block applied num_layers times; ours have their own
weights, what the paper describes.)

`DraftWithAcceptanceHead` bundles a frozen draft Transformer with its head so that the
decoding loop sees one draft model of the usual protocol (`init_cache` / `extend` /
`rewind`), plus `extend_with_acceptance`, which returns the head's prediction beside the
logits from the same call. The head is trained by train/acceptance_distill.py; decoding with
it is decoding/speculative/specdecpp.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.core.params import param
from models.core.protocol import ModelOutput
from models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class AcceptanceHeadConfig:
    """d_model: the draft's width. num_layers: residual blocks (the README's `layer=3`)."""
    d_model: int
    num_layers: int = 3

    def __post_init__(self):
        if self.d_model < 1:
            raise ValueError(f"d_model={self.d_model} must be at least 1")
        if self.num_layers < 0:
            raise ValueError(f"num_layers={self.num_layers} must be >= 0")


class ResBlock(nnx.Module):
    """x + SiLU(W x + b)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.w = param(rngs, (dim, dim), ("embed", "mlp"), stddev=dim ** -0.5)
        self.b = param(rngs, (dim,), ("mlp",), init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jax.nn.silu(x @ self.w[...] + self.b[...])


class AcceptanceHead(nnx.Module):
    """Residual MLP -> 2 logits (reject, accept) per position, in f32."""

    def __init__(self, config: AcceptanceHeadConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.d_model
        self.blocks = nnx.List([ResBlock(d, rngs=rngs) for _ in range(config.num_layers)])
        self.out_w = param(rngs, (d, 2), ("embed", None), stddev=d ** -0.5)
        self.out_b = param(rngs, (2,), (None,), init="zeros")

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., d] (the draft's final-norm output) -> logits f32[..., 2]."""
        x = hidden.astype(jnp.float32)
        for block in self.blocks:
            x = block(x)
        return x @ self.out_w[...] + self.out_b[...]

    def accept_log_odds(self, hidden: jax.Array) -> jax.Array:
        """log P(accept) - log P(reject), f32[...]: the logit of the acceptance probability."""
        logits = self(hidden)
        return logits[..., 1] - logits[..., 0]


class DraftWithAcceptanceHead(nnx.Module):
    """A draft Transformer and its acceptance head, one draft model for the decoding loop.

    It is the draft for the protocol's purposes (same config, vocabulary, cache), so
    `generate` checks and prefills it like any draft; the head adds no cache.
    """

    def __init__(self, draft: Transformer, head: AcceptanceHead):
        if not isinstance(draft, Transformer):
            raise ValueError(f"the draft must be a Transformer (its head reads the final "
                             f"hidden state), got {type(draft).__name__}")
        if head.config.d_model != draft.config.d_model:
            raise ValueError(f"acceptance head d_model={head.config.d_model} differs from the "
                             f"draft's d_model={draft.config.d_model}")
        self.draft = draft
        self.head = head
        self.config = draft.config
        self.vocab_size = draft.vocab_size

    @classmethod
    def new(cls, draft: Transformer, num_layers: int = 3, *, seed: int = 0
            ) -> "DraftWithAcceptanceHead":
        """`draft` with a freshly initialised head."""
        head = AcceptanceHead(AcceptanceHeadConfig(draft.config.d_model, num_layers),
                              rngs=nnx.Rngs(seed))
        return cls(draft, head)

    def __call__(self, tokens: jax.Array, **kwargs) -> ModelOutput:
        return self.draft(tokens, **kwargs)

    def init_cache(self, batch_size: int, max_length: int):
        return self.draft.init_cache(batch_size, max_length)

    def extend(self, tokens: jax.Array, cache, *, num_tokens: jax.Array | None = None):
        return self.draft.extend(tokens, cache, num_tokens=num_tokens)

    def rewind(self, cache, lengths: jax.Array):
        return self.draft.rewind(cache, lengths)

    def extend_with_acceptance(self, tokens: jax.Array, cache
                               ) -> tuple[jax.Array, jax.Array, object]:
        """Like `extend`, and also the head's predicted acceptance log-odds f32[B, S] of
        each fed token (the draft's state at a token is what the head reads to judge it)."""
        d = self.draft
        hidden, cache = d.extend_trunk(tokens, cache, exit_layer=d.config.n_layers)
        normed = d.final_norm(hidden)
        return d.project_to_vocab(normed), self.head.accept_log_odds(normed), cache

    def hidden_states(self, tokens: jax.Array, **kwargs) -> jax.Array:
        """The final-norm states [B, T, d] of a full forward (what the head is trained on)."""
        d = self.draft
        return d.final_norm(d.hidden_at(tokens, d.config.n_layers, **kwargs))
