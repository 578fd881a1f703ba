"""Verification rules of speculative decoding: pure functions on fixed shapes.

A rule maps the target's logits on `[pending, d_1..d_gamma]` (f32[B, gamma+1, V]), the drafts
int32[B, gamma], the draft distributions (f32[B, gamma, V] or None) and the per-row draft
lengths int32[B] to `(n, out, counters)`: n[b] accepted drafts, out[b, :n[b]+1] the tokens to
commit (accepted drafts, then the target's correction or bonus token), and sampler-specific
counters. Slots at and past a row's draft length are never accepted, so rows of one batch
can draft different numbers of tokens.

  GreedyRule    accept while d_i == argmax p_i, then emit argmax p_n; equals target greedy
                decoding (Leviathan et al., arXiv 2211.17192, sec. 2.3 with T=0).
  LosslessRule  speculative sampling: accept d_i with probability min(1, p_i(d_i)/q_i(d_i));
                on the first rejection sample from norm(max(0, p - q)), else the bonus token
                from p_{gamma+1}. The committed tokens are distributed exactly as samples from
                p (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318). A draft
                without a distribution (n-gram) is a one-hot q, which makes the residual
                "p with the draft token removed", as in vLLM's n-gram path.
  FlyRule       FLy's loosened match (arXiv 2511.22972; AMD-AGI/FLy `FLy.py`): a mismatch
                is still accepted when the next W-1 drafts all match the target (deferred
                window), unless the target's top-3 entropy there is below theta (entropy
                gate); greedy, or against a few target samples per slot at T > 0. Not
                lossless.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from decoding import sampling


def leading_true(mask: jax.Array) -> jax.Array:
    """int32[B]: how many leading entries of each row of mask bool[B, K] are True."""
    return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def _slots(drafts: jax.Array, draft_len: jax.Array) -> jax.Array:
    """bool[B, gamma]: which draft slots hold a real draft in each row."""
    return jnp.arange(drafts.shape[1], dtype=jnp.int32)[None, :] < draft_len[:, None]


def _emit(drafts: jax.Array, n: jax.Array, last: jax.Array) -> jax.Array:
    """int32[B, gamma+1]: drafts before slot n, `last` (int32[B]) at slot n."""
    padded = jnp.pad(drafts, ((0, 0), (0, 1)))
    i = jnp.arange(padded.shape[1], dtype=jnp.int32)[None, :]
    return jnp.where(i < n[:, None], padded, last[:, None]).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class GreedyRule:
    """Exact-match verification against the target's argmax."""
    counter_names: tuple[str, ...] = ()

    def __call__(self, rng, logits, drafts, draft_probs, draft_len):
        del rng, draft_probs
        target = sampling.greedy(logits)                                  # [B, gamma+1]
        n = leading_true((drafts == target[:, :-1]) & _slots(drafts, draft_len))
        # Accepted drafts equal the target's argmax, so the target's tokens are the output.
        return n, target, {}


def residual_distribution(p_n: jax.Array, q_n: jax.Array, bonus: jax.Array) -> jax.Array:
    """Where row b samples after its accepted prefix: p_n itself when every draft was accepted
    (bonus[b]), else norm(max(0, p_n - q_n)). Unnormalised weights [B, V]."""
    residual = jnp.maximum(p_n - q_n, 0.0)
    # A rejection implies p(d) < q(d), so the residual has mass; the fallback only guards
    # against an all-zero vector from rounding when p and q are equal to the last ulp.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)
    return jnp.where(bonus[:, None], p_n, residual)


@dataclasses.dataclass(frozen=True)
class LosslessRule:
    """Speculative sampling from the processed target distribution `sampling`."""
    sampling: sampling.SamplingConfig | sampling.SamplingParams
    counter_names: tuple[str, ...] = ()

    def __call__(self, rng, logits, drafts, draft_probs, draft_len):
        batch, gamma = drafts.shape
        p = sampling.probs(logits, self.sampling)                         # [B, gamma+1, V]
        q = draft_probs
        if q is None:  # a draft without a distribution proposes its tokens with certainty
            q = jax.nn.one_hot(drafts, p.shape[-1], dtype=p.dtype)
        key_accept, key_residual = jax.random.split(rng)
        p_d = jnp.take_along_axis(p[:, :gamma], drafts[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        u = jax.random.uniform(key_accept, (batch, gamma))
        # u < p/q without dividing (q_d > 0 for any token the draft could have proposed).
        n = leading_true((u * q_d < p_d) & _slots(drafts, draft_len))
        q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)     # [B, gamma+1, V]
        p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
        q_n = jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0]
        weights = residual_distribution(p_n, q_n, n == draft_len)
        y = jax.random.categorical(key_residual, jnp.log(weights), axis=-1).astype(jnp.int32)
        return n, _emit(drafts, n, y), {}


def top_k_entropy(logits: jax.Array, k: int = 3) -> jax.Array:
    """-sum over the k most likely tokens of p log p, with p the softmax over the FULL
    vocabulary (not renormalised over the k), as FLy's `calculate_topk_entropy` computes."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top = jax.lax.top_k(logp, min(k, logp.shape[-1]))[0]
    return -jnp.sum(jnp.exp(top) * top, axis=-1)


@dataclasses.dataclass(frozen=True)
class FlyRule:
    """FLy's loosely speculative verification.

    window (W): a mismatch at slot i is rescued when slots i+1..i+W-1 all match and slot i+W
        still holds a draft (FLy's code un-rescues the last W slots). W = 0 turns the window
        off, which leaves exact matching; W = 1 rescues every mismatch but the last.
    entropy_threshold (theta, nats): a mismatch where the target's top-3 entropy is below theta
        (the target is near-certain) is never rescued; theta <= 0 turns the gate off. The
        entropy is of the raw logits, whatever the sampling temperature, as in FLy's code.
    sampling: None verifies against the target's argmax (FLy's T = 0). Otherwise FLy's T > 0
        heuristic (`_batch_verification`): the target draws `sample_times` tokens per slot from
        the processed distribution, a slot matches when any of them equals the draft, and the
        correction (or bonus) token is the first draw. Not distribution-preserving.
    Counters: draft-slot mismatches (FLy's `InitialMismatch`) and the rescued mismatches that
    were accepted, i.e. committed draft tokens the target did not produce (FLy's `FLyAccepted`
    also counts rescues past the first rejection; ours do not).
    """
    window: int = 6
    entropy_threshold: float = 0.3
    sampling: sampling.SamplingConfig | sampling.SamplingParams | None = None
    sample_times: int = 2
    counter_names: tuple[str, ...] = ("mismatches", "rescued")

    def _target_tokens(self, rng, logits, drafts):
        """The target's tokens int32[B, gamma+1] (what slot n emits) and which drafts they
        match bool[B, gamma]."""
        if self.sampling is None:
            target = sampling.greedy(logits)
            return target, drafts == target[:, :-1]
        log_p = jnp.log(sampling.probs(logits, self.sampling))
        draws = jax.random.categorical(rng, log_p, axis=-1,
                                       shape=(self.sample_times,) + log_p.shape[:-1])
        draws = draws.astype(jnp.int32)                                   # [S, B, gamma+1]
        return draws[0], jnp.any(draws[:, :, :-1] == drafts[None], axis=0)

    def __call__(self, rng, logits, drafts, draft_probs, draft_len):
        del draft_probs
        gamma = drafts.shape[1]
        target, match = self._target_tokens(rng, logits, drafts)
        slots = _slots(drafts, draft_len)
        match = match & slots
        rescued = jnp.zeros_like(match)
        if self.window >= 1:
            follow = jnp.ones_like(match)
            for j in range(1, self.window):
                shifted = jnp.pad(match[:, j:], ((0, 0), (0, j)))         # match[i + j]
                follow &= shifted
            i = jnp.arange(gamma, dtype=jnp.int32)[None, :]
            rescued = ~match & follow & (i + self.window < draft_len[:, None])
            if self.entropy_threshold > 0:
                rescued &= top_k_entropy(logits[:, :-1], 3) >= self.entropy_threshold
        n = leading_true(match | rescued)
        accepted = jnp.arange(gamma, dtype=jnp.int32)[None, :] < n[:, None]
        counters = {"mismatches": jnp.sum(slots & ~match, axis=1),
                    "rescued": jnp.sum(rescued & accepted, axis=1)}
        # Accepted slots keep the DRAFT token (a rescued mismatch included); slot n gets the
        # target's token, computed conditioned on the accepted drafts.
        last = jnp.take_along_axis(target, n[:, None], axis=1)[:, 0]
        return n, _emit(drafts, n, last), counters
