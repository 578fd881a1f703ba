"""Speculative samplers on the shared loop.

Greedy variants (draft model, n-gram, FLy with its window off, early-exit self-speculation)
must reproduce the target's greedy decoding token for token on a ragged batch whose rows
accept different numbers of drafts. FLy with a loose window may deviate from greedy only where
it rescued a mismatch. Lossless speculative sampling must emit the target's own distribution:
the joint of the first two tokens over thousands of rows, against the exact joint computed
from full forward passes, by a chi-square test that rejects a wrong residual.
"""
import numpy as np
import scipy.special
from scipy import stats

from decoding.generate import generate
from decoding.sampling import SamplingConfig
from decoding.speculative import FlyConfig, SelfSpecConfig, SpeculativeConfig, rules
from tests.decoding import helpers

PROMPTS, MAX_NEW, EOS = helpers.PROMPTS, helpers.MAX_NEW, helpers.EOS


def _greedy(m):
    return generate(m, PROMPTS, max_new_tokens=MAX_NEW, eos_id=EOS).tokens


def _varied_acceptance(stats_: dict) -> bool:
    """Rounds committed different numbers of tokens (so rows rolled back differently)."""
    return sum(1 for c in stats_["accepted_hist"] if c) >= 3


def test_greedy_speculative_decoding_equals_greedy_decoding():
    m, draft = helpers.model(), helpers.noisy_copy(noise=0.3)
    out = generate(m, PROMPTS, sampler="speculative_greedy", draft_model=draft,
                   max_new_tokens=MAX_NEW, eos_id=EOS)
    assert out.tokens == _greedy(m)
    s = out.stats
    assert 0 < s["accepted"] < s["drafted"] and _varied_acceptance(s)
    assert s["draft_calls"] == SpeculativeConfig().gamma * s["target_calls"]
    assert s["tokens_per_target_call"] > 1.0


def test_a_draft_equal_to_the_target_is_always_accepted():
    """Every round accepts all drafts, so the next round starts with the draft one token
    behind (it never ran its last draft): a draft cache that skipped that catch-up would
    condition on a missing entry, disagree with the target and get rejected."""
    m = helpers.model()
    out = generate(m, PROMPTS, sampler="speculative_greedy", draft_model=m,
                   max_new_tokens=MAX_NEW, eos_id=EOS)
    assert out.tokens == _greedy(m)
    s = out.stats
    assert s["accepted"] == s["drafted"] > 0
    gamma = SpeculativeConfig().gamma
    assert s["accepted_hist"][gamma + 1] >= len(PROMPTS) * (MAX_NEW // (gamma + 1))


def test_ngram_speculative_decoding_equals_greedy_decoding():
    m = helpers.model()
    out = generate(m, PROMPTS, sampler="ngram_greedy", max_new_tokens=MAX_NEW, eos_id=EOS)
    assert out.tokens == _greedy(m)
    assert out.stats["accepted"] > 0 and out.stats["draft_calls"] == 0
    assert out.stats["tokens_per_target_call"] > 1.0


def test_fly_without_window_is_greedy_speculative_decoding():
    m, draft = helpers.model(), helpers.noisy_copy(noise=0.3)
    out = generate(m, PROMPTS, sampler="fly", draft_model=draft,
                   config=FlyConfig(window=0), max_new_tokens=MAX_NEW, eos_id=EOS)
    assert out.tokens == _greedy(m)
    s = out.stats
    assert s["rescued"] == 0 and s["mismatches"] > 0 and _varied_acceptance(s)
    # The n-gram level lets one draft call add several tokens.
    assert s["draft_calls"] < s["drafted"]


def test_fly_deviates_from_greedy_only_where_it_rescued_a_mismatch():
    m, draft = helpers.model(), helpers.noisy_copy(noise=0.3)
    out = generate(m, PROMPTS, sampler="fly", draft_model=draft,
                   config=FlyConfig(window=2, entropy_threshold=0.0),
                   max_new_tokens=MAX_NEW, eos_id=EOS)
    # Count committed tokens that are not the target's argmax after the committed prefix.
    prefixes = [p + t[:i] for p, t in zip(PROMPTS, out.tokens) for i in range(len(t))]
    emitted = [tok for t in out.tokens for tok in t]
    argmax = helpers.next_token_logits(m, prefixes).argmax(-1)
    deviations = int(np.sum(argmax != np.array(emitted)))
    assert 0 < deviations <= out.stats["rescued"] <= out.stats["mismatches"]
    assert out.stats["tokens_per_target_call"] > 1.0


def test_fly_sampling_with_a_one_token_support_is_greedy_fly():
    """fly_sample draws from the target's processed distribution; with top_k = 1 every draw
    is the argmax, so it must commit exactly what greedy FLy commits, and it runs the same
    drafts (so the same rounds)."""
    m, draft = helpers.model(), helpers.noisy_copy(noise=0.3)
    config = FlyConfig(window=2, entropy_threshold=0.0)
    greedy_fly = generate(m, PROMPTS, sampler="fly", draft_model=draft, config=config,
                          max_new_tokens=MAX_NEW, eos_id=EOS)
    sampled = generate(m, PROMPTS, sampler="fly_sample", draft_model=draft, config=config,
                       sampling=SamplingConfig(temperature=0.7, top_k=1),
                       max_new_tokens=MAX_NEW, eos_id=EOS, seed=3)
    assert sampled.tokens == greedy_fly.tokens
    assert sampled.stats["accepted_hist"] == greedy_fly.stats["accepted_hist"]


def test_self_speculative_greedy_equals_greedy_with_per_row_draft_lengths():
    # A sharper head spreads the early exit's confidence around the threshold, so rows stop
    # drafting at different lengths; the argmax (and the greedy output) does not change.
    m = helpers.model(0, head_scale=30.0)
    config = SelfSpecConfig(exit_layer=1, gamma=4, threshold=0.4)
    out = generate(m, PROMPTS, sampler="self_spec_greedy", config=config,
                   max_new_tokens=MAX_NEW, eos_id=EOS)
    assert out.tokens == _greedy(m)
    s = out.stats
    row_rounds = sum(s["accepted_hist"])
    assert row_rounds < s["drafted"] < config.gamma * row_rounds  # adaptive draft lengths
    assert s["accepted"] > 0
    assert s["target_calls"] < s["draft_calls"] <= config.gamma * s["target_calls"]


def test_self_speculation_through_an_adapter_equals_greedy():
    """Kangaroo proper: drafts through a (here random) adapter with its own cache, verified
    from the exit states; the output is still the target's greedy decoding."""
    m = helpers.model(0, head_scale=30.0)
    config = SelfSpecConfig(exit_layer=1, gamma=4, threshold=0.4)
    out = generate(m, PROMPTS, sampler="self_spec_greedy", config=config,
                   draft_model=helpers.adapter(m, noise=0.01), max_new_tokens=MAX_NEW,
                   eos_id=EOS)
    assert out.tokens == _greedy(m)
    s = out.stats
    assert s["accepted"] > 0 and _varied_acceptance(s)
    plain = generate(m, PROMPTS, sampler="self_spec_greedy", config=config,
                     max_new_tokens=MAX_NEW, eos_id=EOS).stats
    assert s["accepted_hist"] != plain["accepted_hist"]  # the adapter changed the drafts


# ---------------------------------------------------------------- distribution (lossless)

_PROMPT = [1, 2, 3]
_V = 8


def _exact_joint(m) -> np.ndarray:
    """p(x1, x2 | prompt) [8, 8] of the target at temperature 1, from full forwards."""
    first = scipy.special.softmax(helpers.next_token_logits(m, [_PROMPT])[0].astype(np.float64))
    second = scipy.special.softmax(helpers.next_token_logits(
        m, [_PROMPT + [x] for x in range(_V)]).astype(np.float64), axis=-1)
    return first[:, None] * second


def _joint_counts(tokens: list[list[int]]) -> np.ndarray:
    counts = np.zeros((_V, _V))
    for t in tokens:
        counts[t[0], t[1]] += 1
    return counts


def _p_value(counts: np.ndarray, p: np.ndarray) -> float:
    """Chi-square p-value, pooling cells expected below 5 into one."""
    expected = p.ravel() * counts.sum()
    observed = counts.ravel()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue


def _lossless(rows: int, sampler: str = "speculative", **kw):
    target = helpers.model(0, vocab=_V, head_scale=10.0)
    out = generate(target, [_PROMPT] * rows, sampler=sampler, max_new_tokens=2, seed=7,
                   sampling=SamplingConfig(temperature=1.0), **kw)
    return _joint_counts(out.tokens), _exact_joint(target), out.stats


def _draft():
    return helpers.model(1, vocab=_V, head_scale=10.0)


def test_lossless_speculative_sampling_matches_the_target_distribution():
    counts, p, s = _lossless(4000, draft_model=_draft(), config=SpeculativeConfig(gamma=3))
    assert _p_value(counts, p) > 1e-3
    # The draft differs enough from the target that rejections (and residuals) are common.
    assert 0.2 < s["acceptance_rate"] < 0.9


def test_the_distribution_test_rejects_a_wrong_residual(monkeypatch):
    monkeypatch.setattr(rules, "residual_distribution", lambda p_n, q_n, bonus: p_n)
    # Another batch size: a new trace, which picks up the patched residual.
    counts, p, _ = _lossless(4001, draft_model=_draft(), config=SpeculativeConfig(gamma=3))
    assert _p_value(counts, p) < 1e-6


def test_lossless_self_speculation_matches_the_target_distribution():
    counts, p, s = _lossless(4000, sampler="self_spec",
                             config=SelfSpecConfig(exit_layer=1, gamma=3, threshold=0.3))
    assert _p_value(counts, p) > 1e-3
    assert s["accepted"] > 0


def test_lossless_self_speculation_through_an_adapter_matches_the_target_distribution():
    target = helpers.model(0, vocab=_V, head_scale=10.0)
    counts, p, s = _lossless(4000, sampler="self_spec", draft_model=helpers.adapter(target),
                             config=SelfSpecConfig(exit_layer=1, gamma=3, threshold=0.3))
    assert _p_value(counts, p) > 1e-3
    assert 0 < s["accepted"] < s["drafted"]
