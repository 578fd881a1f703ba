"""FLy: training-free loosely speculative decoding (arXiv 2511.22972; AMD-AGI/FLy @6667ae8,
`fly/models/FLy.py`, whose code is the ground truth here since the paper body was unavailable).

Two parts:
- Verification (`rules.FlyRule`): greedy matching loosened by a deferred window W (a mismatch
  is accepted when the target keeps agreeing with the draft for the W-1 following slots,
  which it scored *conditioned on* the deviating token) and an entropy gate theta (never
  rescue a mismatch where the target's top-3 entropy is below theta nats). Not lossless.
- Multi-level drafting (`multilevel_draft`, FLy's `draft_with_ngram`): n-gram lookup proposes
  up to 6 tokens, the draft model checks them in one call by exact greedy match and adds its
  own next token, repeated until gamma (FLy's spd_k = 15) drafts exist; then the target
  verifies with the FLy rule. Three levels: n-gram -> draft model -> target.

With the window off (W = 0) the rule is exact greedy matching, so the sampler is greedy
speculative decoding with a multi-level drafter and reproduces the target's greedy output.
At T > 0 (sampler "fly_sample") FLy's code keeps drafting greedily at both drafter levels and
loosens only the target's check: it draws `sample_times` = 2 tokens per slot, counts a slot
as matched when either equals the draft, and corrects with the first draw; the window and the
gate then act as at T = 0. This heuristic is not distribution-preserving.
"""
from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from decoding import loop, sampling
from decoding.speculative import ngram, rules, verify
from decoding.speculative.base import DraftAndVerify


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FlyConfig:
    """FLy's defaults (fly_config/FLy_Llama3_70b.json and FLy.py): spd_k = 15 drafts per
    round, win_len W = 6, entropy_thre theta = 0.3 nats, n-gram level with max n = 4 proposing
    6 tokens. window = 0 turns the window off; entropy_threshold <= 0 turns the gate off."""
    gamma: int = 15
    window: int = 6
    entropy_threshold: float = 0.3
    use_ngram: bool = True
    max_ngram: int = 4
    ngram_tokens: int = 6
    sample_times: int = 2  # target draws per slot at T > 0 (FLy's sample_times)

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError(f"gamma={self.gamma} must be at least 1")
        if self.window < 0:
            raise ValueError(f"window={self.window} must be >= 0 (0 turns the window off)")
        if self.sample_times < 1:
            raise ValueError(f"sample_times={self.sample_times} must be at least 1")
        if self.use_ngram and (self.max_ngram < 1 or self.ngram_tokens < 1):
            raise ValueError(f"max_ngram={self.max_ngram} and ngram_tokens={self.ngram_tokens} "
                             "must be at least 1 when use_ngram=True")


def multilevel_draft(draft, cache, seq: jax.Array, seq_len: jax.Array, *, gamma: int,
                     ngram_tokens: int, max_ngram: int):
    """At least gamma greedy draft-model tokens per row, accelerated by n-gram proposals.

    Each draft call scores [pending, proposal] (ngram_tokens = 0: no n-gram level, one token
    per call), keeps the proposal's prefix that matches the draft's own argmax and appends the
    draft's next token, so it adds 1..ngram_tokens + 1 tokens. Rows stop adding once they have
    gamma; the loop ends when every row has, after at most gamma calls.

    Returns drafts int32[B, gamma], the draft cache (holding everything but the newest draft)
    and the number of draft calls.
    """
    batch, length = seq.shape
    m = ngram_tokens
    i = jnp.arange(m + 1, dtype=jnp.int32)[None, :]
    rows = jnp.arange(batch)[:, None]

    def cond(carry):
        _, _, count, calls = carry
        return jnp.any(count < gamma) & (calls < gamma)

    def body(carry):
        seq, cache, count, calls = carry
        cur = seq_len + count
        if m > 0:
            proposal, proposal_len = ngram.ngram_propose(seq, cur, num_tokens=m,
                                                         max_ngram=max_ngram)
            positions = jnp.where(i[:, :m] < proposal_len[:, None], cur[:, None] + i[:, :m],
                                  length)
            seq = seq.at[rows, positions].set(proposal, mode="drop")
        logits, cache = verify.extend_from_pending(draft, cache, seq, cur, m)
        greedy = sampling.greedy(logits)                                  # [B, m + 1]
        accepted = (rules.leading_true((proposal == greedy[:, :m])
                                       & (i[:, :m] < proposal_len[:, None]))
                    if m > 0 else jnp.zeros_like(cur))
        # Matched proposals equal the draft's argmax, so the new tokens are greedy[:a + 1].
        add = jnp.where(count < gamma, accepted + 1, 0)
        positions = jnp.where(i < add[:, None], cur[:, None] + i, length)
        seq = seq.at[rows, positions].set(greedy, mode="drop")
        cache = draft.rewind(cache, cur + add - 1)
        return seq, cache, count + add, calls + 1

    count = jnp.zeros((batch,), jnp.int32)
    seq, cache, _, calls = jax.lax.while_loop(
        cond, body, (seq, cache, count, jnp.zeros((), jnp.int32)))
    index = jnp.clip(seq_len[:, None] + jnp.arange(gamma)[None, :], 0, length - 1)
    return jnp.take_along_axis(seq, index, axis=1), cache, calls


@dataclasses.dataclass(frozen=True)
class FlySpeculative(DraftAndVerify):
    """FLy on the shared loop: multi-level greedy drafting, FLy verification (against the
    target's argmax, or against its samples when `sampling` is given)."""
    target: nnx.GraphDef
    draft: nnx.GraphDef
    config: FlyConfig
    sampling: sampling.SamplingFilters | None = None

    @property
    def cache_slack(self) -> int:
        # The draft may run past gamma by one n-gram chunk, plus its catch-up chunk.
        return self.config.gamma + 2 * (self.config.ngram_tokens + 2)

    def rule(self, params: sampling.SamplingParams | None) -> rules.FlyRule:
        return rules.FlyRule(window=self.config.window,
                             entropy_threshold=self.config.entropy_threshold,
                             sampling=params, sample_times=self.config.sample_times)

    def step(self, state: loop.LoopState, weights) -> loop.LoopState:
        target = nnx.merge(self.target, weights["target"])
        draft = nnx.merge(self.draft, weights["draft"])
        c = self.config
        # The drafts live past the committed tokens of a scratch copy of the buffer, which is
        # where the n-gram level searches them too (FLy looks up prompt + generated + drafts).
        seq = jnp.pad(state.tokens, ((0, 0), (0, c.gamma + c.ngram_tokens + 2)))
        drafts, draft_cache, calls = multilevel_draft(
            draft, state.caches["draft"], seq, state.lengths, gamma=c.gamma,
            ngram_tokens=c.ngram_tokens if c.use_ngram else 0, max_ngram=c.max_ngram)
        state = state.replace(caches={**state.caches, "draft": draft_cache})
        state = verify.add_draft_calls(state, calls)
        gamma_b = jnp.full(state.lengths.shape, c.gamma, jnp.int32)
        rng, key_rule = jax.random.split(state.rng)
        return verify.verify_round(state.replace(rng=rng), target, drafts, gamma_b, None,
                                   self.rule(sampling.bind(self.sampling, weights)), key_rule)
