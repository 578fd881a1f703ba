"""The speculative accept rules and the n-gram proposer on hand-made inputs.

The lossless rule is checked where it matters: the first committed token, over many draws
with a draft q sampled from its own distribution, must follow the target p exactly; the same
statistic rejects a rule whose residual step is wrong (residual = p instead of
norm(max(0, p - q))), so the test would catch that bug.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from decoding.sampling import SamplingConfig
from decoding.speculative import ngram_propose, rules

# Rules are frozen dataclasses: jit them as static arguments, compiled once per rule and shape
# (op-by-op eager execution is several times slower on CPU).
_apply = jax.jit(lambda rule, *args: rule(*args), static_argnums=0)

P = np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32)
Q = np.array([0.3, 0.1, 0.4, 0.1, 0.1], np.float32)   # far from P: acceptance ~ 0.45


def _first_token_counts(n: int, one_hot: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the first committed token over n rows with gamma = 2 drafts from Q, and
    each row's number of accepted drafts."""
    gamma, vocab = 2, P.size
    key_d, key_r = jax.random.split(jax.random.key(seed))
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(P)), (n, gamma + 1, vocab))
    if one_hot:   # a deterministic proposal (n-gram): the draft "distribution" is one-hot
        drafts = jnp.full((n, gamma), 2, jnp.int32)
        q = None
    else:
        drafts = jax.random.categorical(key_d, jnp.log(jnp.asarray(Q)), shape=(n, gamma))
        q = jnp.broadcast_to(jnp.asarray(Q), (n, gamma, vocab))
    rule = rules.LosslessRule(SamplingConfig())
    n_acc, out, _ = _apply(rule, key_r, logits, drafts.astype(jnp.int32), q,
                                  jnp.full((n,), gamma, jnp.int32))
    return np.bincount(np.asarray(out[:, 0]), minlength=vocab), np.asarray(n_acc)


def _p_value(counts: np.ndarray, p: np.ndarray) -> float:
    """Pearson chi-square p-value of counts against the distribution p."""
    p = np.asarray(p, np.float64)
    return stats.chisquare(counts, p / p.sum() * counts.sum()).pvalue


@pytest.mark.parametrize("one_hot", [False, True])
def test_lossless_rule_emits_the_target_distribution(one_hot):
    n = 40_000
    counts, accepted = _first_token_counts(n, one_hot)
    assert _p_value(counts, P) > 1e-3, counts / n
    # Acceptance of the first draft is sum(min(p, q)) (one-hot: p(d) = 0.1).
    alpha = 0.1 if one_hot else np.minimum(P, Q).sum()
    assert abs(np.mean(accepted > 0) - alpha) < 0.01


def test_a_wrong_residual_is_rejected_by_the_same_statistic(monkeypatch):
    monkeypatch.setattr(rules, "residual_distribution", lambda p_n, q_n, bonus: p_n)
    n = 40_001  # a new shape, so the rule is traced again with the patched residual
    counts, _ = _first_token_counts(n, one_hot=False, seed=1)
    assert _p_value(counts, P) < 1e-12


def test_lossless_rule_masks_slots_past_each_rows_draft_length():
    p = jnp.log(jnp.asarray(np.eye(5, dtype=np.float32)[[1, 3, 4]] * 0.999 + 0.0002))
    logits = jnp.broadcast_to(p, (2, 3, 5))
    drafts = jnp.array([[1, 3], [1, 3]], jnp.int32)
    q = jax.nn.one_hot(drafts, 5)
    n, out, _ = _apply(rules.LosslessRule(SamplingConfig()),
        jax.random.key(0), logits, drafts, q, jnp.array([2, 1], jnp.int32))
    # Row 0 accepts both drafts and takes the bonus from p_3; row 1 may use only one draft.
    np.testing.assert_array_equal(n, [2, 1])
    np.testing.assert_array_equal(out[0], [1, 3, 4])
    np.testing.assert_array_equal(out[1, :2], [1, 3])


def test_greedy_rule_accepts_the_matching_prefix_per_row():
    target = jnp.array([[3, 1, 4, 1], [3, 1, 4, 1], [2, 7, 1, 8]])
    logits = jax.nn.one_hot(target, 10)
    drafts = jnp.array([[3, 1, 4], [3, 0, 4], [2, 7, 1]], jnp.int32)
    n, out, _ = _apply(rules.GreedyRule(), None, logits, drafts, None, jnp.array([3, 3, 2]))
    np.testing.assert_array_equal(n, [3, 1, 2])
    np.testing.assert_array_equal(out, target)  # accepted drafts equal the target's tokens


def _fly(match_pattern, entropy_low=(), window=3, theta=0.3, draft_len=None):
    """FlyRule on one row whose drafts match the target where match_pattern is 1; slots in
    entropy_low get a near-certain target (top-3 entropy ~0), the others a flat one."""
    k = len(match_pattern)
    target = np.arange(k + 1) % 5
    drafts = np.where(np.array(match_pattern, bool), target[:k], 9)
    logits = np.zeros((k + 1, 10), np.float32)
    logits[np.arange(k + 1), target] = 1.0             # flat-ish: entropy ~ 1 nat
    for i in entropy_low:
        logits[i, target[i]] = 30.0                     # near-certain: entropy ~ 0
    draft_len = k if draft_len is None else draft_len
    rule = rules.FlyRule(window=window, entropy_threshold=theta)
    n, out, counters = _apply(rule, None, jnp.asarray(logits)[None],
                              jnp.asarray(drafts)[None], None, jnp.array([draft_len]))
    return int(n[0]), np.asarray(out[0]), {k: int(v[0]) for k, v in counters.items()}


def test_fly_window_rescues_a_mismatch_followed_by_w_minus_1_matches():
    # W=3: the mismatch at 1 is followed by matches at 2, 3 and slot 4 exists -> rescued.
    n, out, counters = _fly([1, 0, 1, 1, 1, 0])
    assert n == 5 and out[1] == 9                      # the DRAFT token is kept
    assert out[5] == 5 % 5                             # then the target's own token
    assert counters == {"mismatches": 2, "rescued": 1}
    # Only one match after it: not rescued.
    n, _, _ = _fly([1, 0, 1, 0, 1, 1])
    assert n == 1


def test_fly_never_rescues_in_the_last_window_slots():
    # The mismatch at 2 has matches at 3, 4 but no slot after them (FLy's code masks the last
    # W slots back to exact match).
    n, _, counters = _fly([1, 1, 0, 1, 1])
    assert n == 2 and counters["rescued"] == 0


def test_fly_entropy_gate_blocks_rescue_where_the_target_is_certain():
    n, _, counters = _fly([1, 0, 1, 1, 1, 0], entropy_low=[1])
    assert n == 1 and counters["rescued"] == 0
    n, _, _ = _fly([1, 0, 1, 1, 1, 0], entropy_low=[1], theta=0.0)   # gate off
    assert n == 5


def test_fly_with_the_window_off_is_exact_greedy_matching():
    for pattern in ([1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]):
        n, _, _ = _fly(pattern, window=0)
        assert n == (pattern.index(0) if 0 in pattern else len(pattern))


@pytest.mark.parametrize("sample_times", [1, 2, 3])
def test_fly_at_temperature_matches_a_draft_any_of_the_target_draws_equal(sample_times):
    """FLy's T > 0 check: one draft d with target probability P[d] is accepted with
    probability 1 - (1 - P[d])^sample_times, and the token emitted after a rejection is the
    first draw, i.e. P conditioned on that draw not being d."""
    rows, d = 20000, 3
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(P)), (rows, 2, P.size))
    rule = rules.FlyRule(window=0, sampling=SamplingConfig(), sample_times=sample_times)
    n, out, counters = _apply(rule, jax.random.key(sample_times), logits,
                              jnp.full((rows, 1), d, jnp.int32), None,
                              jnp.ones((rows,), jnp.int32))
    n, out = np.asarray(n), np.asarray(out)
    expected = 1 - (1 - P[d]) ** sample_times
    assert abs(n.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / rows)
    assert int(counters["mismatches"].sum()) == int((n == 0).sum())
    corrections = np.bincount(out[n == 0, 0], minlength=P.size)
    assert corrections[d] == 0
    assert _p_value(np.delete(corrections, d), np.delete(P, d)) > 1e-3


def test_top_k_entropy_uses_full_vocabulary_probabilities():
    logits = jnp.log(jnp.array([0.5, 0.2, 0.2, 0.1]))
    expected = -sum(p * np.log(p) for p in (0.5, 0.2, 0.2))
    np.testing.assert_allclose(rules.top_k_entropy(logits, 3), expected, rtol=1e-6)


def test_ngram_proposes_what_followed_the_latest_longest_match():
    tokens = jnp.array([
        [5, 6, 7, 1, 5, 6, 8, 2, 5, 6, 0, 0],     # "5 6" occurs at 0 and 4: latest wins -> 8 2
        [1, 2, 3, 4, 9, 3, 4, 2, 3, 4, 0, 0],     # 3-gram "2 3 4" beats the later 2-gram "3 4"
        [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0],     # no earlier occurrence of "6"
        [7, 7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0],     # overlapping occurrence: 1 following token
    ], jnp.int32)
    lengths = jnp.array([10, 10, 6, 4])
    proposal, plen = jax.jit(ngram_propose, static_argnames=("num_tokens", "max_ngram",
                                                             "min_ngram"))(
        tokens, lengths, num_tokens=3, max_ngram=3)
    np.testing.assert_array_equal(plen, [3, 3, 0, 1])
    np.testing.assert_array_equal(proposal[0], [8, 2, 5])
    np.testing.assert_array_equal(proposal[1], [9, 3, 4])
    np.testing.assert_array_equal(proposal[3, :1], [7])
