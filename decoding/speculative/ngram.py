"""n-gram (prompt lookup) drafting: propose the tokens that followed the latest earlier
occurrence of the row's last n tokens (Saxena 2023, "Prompt Lookup Decoding",
github.com/apoorvumang/prompt-lookup-decoding; verified as in Leviathan et al., arXiv
2211.17192).

`ngram_propose` is vectorised over the batch and the buffer, on device, with static shapes:
every (row, start) pair is compared at once and the latest match wins, longest n first. It
drafts for `NgramSpeculative` on its own (no draft model: greedy or lossless verification with a
one-hot q) and is the first level of FLy's multi-level drafter (decoding/speculative/fly.py).
"""
from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from decoding import loop, sampling
from decoding.speculative import verify
from decoding.speculative.base import DraftAndVerify


@gin.configurable
@dataclasses.dataclass(frozen=True)
class NgramConfig:
    """gamma: tokens proposed per round; n-grams are tried from max_ngram down to min_ngram.
    Defaults are prompt-lookup decoding's (max_ngram_size=3, num_pred_tokens=10)."""
    gamma: int = 10
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError(f"gamma={self.gamma} must be at least 1")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram="
                             f"{self.min_ngram}, max_ngram={self.max_ngram}")


def ngram_propose(tokens: jax.Array, lengths: jax.Array, *, num_tokens: int, max_ngram: int,
                  min_ngram: int = 1) -> tuple[jax.Array, jax.Array]:
    """Prompt-lookup proposals for each row of tokens int32[B, L] holding lengths[b] tokens.

    For n = max_ngram..min_ngram, the row's last n tokens are searched for in its earlier
    tokens; the latest occurrence that is followed by at least one token wins (longest n
    first). Returns proposal int32[B, num_tokens] (the tokens after that occurrence) and
    proposal_len int32[B] (0 where nothing matched; at most the tokens that exist).
    """
    batch, length = tokens.shape
    lengths = lengths.astype(jnp.int32)
    follow = jnp.full((batch,), -1, jnp.int32)  # position of the first proposed token
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= length:
            continue
        key_index = jnp.clip(lengths[:, None] - n + jnp.arange(n)[None, :], 0, length - 1)
        key = jnp.take_along_axis(tokens, key_index, axis=1)                  # [B, n]
        starts = length - n + 1
        match = jnp.ones((batch, starts), bool)
        for t in range(n):
            match &= tokens[:, t:t + starts] == key[:, t:t + 1]
        j = jnp.arange(starts, dtype=jnp.int32)[None, :]
        # An earlier occurrence (it may overlap the key) with a token after it; the key itself
        # starts at lengths - n and is excluded by j + n < lengths.
        valid = match & (j + n < lengths[:, None]) & (lengths[:, None] > n)
        latest = jnp.max(jnp.where(valid, j, -1), axis=1)
        follow = jnp.where((follow < 0) & (latest >= 0), latest + n, follow)
    found = follow >= 0
    proposal_len = jnp.where(found, jnp.minimum(num_tokens, lengths - follow), 0)
    index = jnp.clip(follow[:, None] + jnp.arange(num_tokens)[None, :], 0, length - 1)
    proposal = jnp.take_along_axis(tokens, index, axis=1)
    i = jnp.arange(num_tokens)[None, :]
    proposal = jnp.where(i < proposal_len[:, None], proposal, 0)
    return proposal.astype(jnp.int32), proposal_len.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class NgramSpeculative(DraftAndVerify):
    """Prompt-lookup speculative decoding: no draft model, the target verifies the proposal
    (greedy when sampling is None, else lossless with a one-hot draft distribution). A row
    without a match drafts nothing and its round is a plain decoding step."""
    target: nnx.GraphDef
    config: NgramConfig
    sampling: sampling.SamplingFilters | None = None

    def step(self, state: loop.LoopState, weights) -> loop.LoopState:
        target = nnx.merge(self.target, weights["target"])
        rng, key = jax.random.split(state.rng)
        c = self.config
        drafts, draft_len = ngram_propose(state.tokens, state.lengths, num_tokens=c.gamma,
                                          max_ngram=c.max_ngram, min_ngram=c.min_ngram)
        # q = None: LosslessRule treats the proposal as a one-hot draft distribution.
        return verify.verify_round(state.replace(rng=rng), target, drafts, draft_len, None,
                                   self.rule(sampling.bind(self.sampling, weights)), key)
