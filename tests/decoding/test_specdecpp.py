"""SpecDec++ (arXiv 2405.19715): the acceptance head, its training loss, and the samplers.

As for the other speculative samplers: the greedy variant reproduces the target's greedy
decoding on a ragged batch whose rows stop drafting at different lengths; the stop rule does
what it says at its extremes (a head sure of acceptance drafts gamma tokens every round, i.e.
plain speculative decoding; a head sure of rejection stops at min_draft); the sampling
variant keeps the target's distribution over the first three tokens (the first two come from
drafts every row makes, the third depends on where the head stopped the row).
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from decoding.generate import generate
from decoding.sampling import SamplingConfig
from decoding.speculative import SpecDecPPConfig
from models.acceptance_head import DraftWithAcceptanceHead
from tests.decoding import helpers
from tests.decoding.test_speculative import _p_value
from tests.tolerances import F32
from train import acceptance_distill

PROMPTS, MAX_NEW, EOS = helpers.PROMPTS, helpers.MAX_NEW, helpers.EOS
CONFIG = SpecDecPPConfig(gamma=4, threshold=0.3, min_draft=2)


def _with_head(draft, accept_bias: float, seed: int = 0, num_layers: int = 1
               ) -> DraftWithAcceptanceHead:
    """draft with a random head whose acceptance logit is shifted by accept_bias (a random
    head's predictions spread around 1/4 to 1/2; the shift moves them across the threshold)."""
    model = DraftWithAcceptanceHead.new(draft, num_layers=num_layers, seed=seed)
    model.head.out_b[...] = jnp.asarray([0.0, accept_bias], jnp.float32)
    return model


def _greedy(m):
    return generate(m, PROMPTS, max_new_tokens=MAX_NEW, eos_id=EOS).tokens


def _specdecpp(m, draft, **kw):
    return generate(m, PROMPTS, sampler="specdecpp_greedy", draft_model=draft, config=CONFIG,
                    max_new_tokens=MAX_NEW, eos_id=EOS, **kw)


def test_greedy_specdecpp_equals_greedy_decoding_and_its_stop_rule_works():
    """One compiled sampler, three heads (their weights are loop inputs, not constants)."""
    m, draft = helpers.model(), helpers.noisy_copy(noise=0.3)
    out = _specdecpp(m, _with_head(draft, 2.0))
    assert out.tokens == _greedy(m)
    s = out.stats
    row_rounds = sum(s["accepted_hist"])
    # Every row drafts at least min_draft; the head stopped some rows before gamma.
    assert CONFIG.min_draft * row_rounds < s["drafted"] < CONFIG.gamma * row_rounds
    assert 0 < s["accepted"] < s["drafted"]
    assert s["target_calls"] < s["draft_calls"] <= CONFIG.gamma * s["target_calls"]

    # Sure of acceptance: never stops, i.e. speculative decoding with gamma drafts per round.
    sure = _specdecpp(m, _with_head(draft, 60.0))
    assert sure.tokens == out.tokens
    assert sure.stats["drafted"] == CONFIG.gamma * sum(sure.stats["accepted_hist"])
    assert sure.stats["draft_calls"] == CONFIG.gamma * sure.stats["target_calls"]
    # Sure of rejection: every row stops at min_draft (the first draft is never judged).
    doubt = _specdecpp(m, _with_head(draft, -60.0))
    assert doubt.tokens == out.tokens
    assert doubt.stats["drafted"] == CONFIG.min_draft * sum(doubt.stats["accepted_hist"])
    assert doubt.stats["draft_calls"] == CONFIG.min_draft * doubt.stats["target_calls"]


def test_specdecpp_refuses_a_draft_without_a_head():
    m = helpers.model()
    with pytest.raises(ValueError, match="DraftWithAcceptanceHead"):
        generate(m, [[1, 2]], sampler="specdecpp_greedy", draft_model=helpers.noisy_copy())
    with pytest.raises(ValueError, match="threshold"):
        SpecDecPPConfig(threshold=1.5)
    with pytest.raises(ValueError, match="min_draft"):
        SpecDecPPConfig(gamma=2, min_draft=3)


# ---------------------------------------------------------------- distribution (lossless)

_PROMPT = [1, 2, 3]
_V = 8


def _exact_joint3(m) -> np.ndarray:
    """p(x1, x2, x3 | prompt) [8, 8, 8] of the target at temperature 1, from full forwards."""
    soft = lambda seqs: scipy.special.softmax(  # noqa: E731
        helpers.next_token_logits(m, seqs).astype(np.float64), axis=-1)
    first = soft([_PROMPT])[0]
    second = soft([_PROMPT + [a] for a in range(_V)])
    # Eight calls of eight rows: the batch shape _exact_joint of test_speculative compiles.
    third = np.stack([soft([_PROMPT + [a, b] for b in range(_V)]) for a in range(_V)])
    return first[:, None, None] * second[:, :, None] * third


def test_lossless_specdecpp_matches_the_target_distribution():
    target = helpers.model(0, vocab=_V, head_scale=10.0)
    draft = _with_head(helpers.model(1, vocab=_V, head_scale=10.0), 2.5, num_layers=3)
    out = generate(target, [_PROMPT] * 4000, sampler="specdecpp", draft_model=draft,
                   config=SpecDecPPConfig(gamma=3), max_new_tokens=3, seed=7,
                   sampling=SamplingConfig(temperature=1.0))
    counts = np.zeros((_V, _V, _V))
    for t in out.tokens:
        counts[t[0], t[1], t[2]] += 1
    assert _p_value(counts, _exact_joint3(target)) > 1e-3
    s = out.stats
    # The head stopped some rounds at 2 drafts and let others draft 3.
    assert 2 * sum(s["accepted_hist"]) < s["drafted"] < 3 * sum(s["accepted_hist"])
    assert 0.2 < s["acceptance_rate"] < 0.9


# ---------------------------------------------------------------- training


def test_weighted_bce_matches_a_reference():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(3, 7)) * 3, rng.uniform(size=(3, 7))
    mask = rng.uniform(size=(3, 7)) < 0.7
    w = 6.0
    a = 1 / (1 + np.exp(-z))
    ref = np.sum(mask * (w * (1 - y) * -np.log(1 - a) + y * -np.log(a)))
    ref /= np.sum(mask * (w * (1 - y) + y))
    got = acceptance_distill.weighted_bce(jnp.asarray(z, jnp.float32),
                                          jnp.asarray(y, jnp.float32), jnp.asarray(mask), w)
    np.testing.assert_allclose(float(got), ref, rtol=F32, atol=F32)


def _batches(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        inputs = rng.integers(0, helpers.VOCAB, (4, 32)).astype(np.int32)
        yield {"inputs": inputs, "segment_ids": np.ones_like(inputs),
               "positions": np.broadcast_to(np.arange(32, dtype=np.int32), inputs.shape)}


def test_training_the_head_lowers_its_held_out_loss():
    """The official soft labels min(1, p/q); the loss must fall well below the untrained
    head's on held-out text."""
    target, draft = helpers.model(), helpers.noisy_copy(noise=0.3)
    config = acceptance_distill.HeadTrainConfig(labels="sampling", steps=30, lr=3e-3,
                                                num_layers=1)
    held_out = list(_batches(1, 2))
    before = acceptance_distill.evaluate(
        target, DraftWithAcceptanceHead.new(draft, 1, seed=config.seed), held_out, config)
    model = acceptance_distill.train_head(target, draft, _batches(0, 30), config)
    after = acceptance_distill.evaluate(target, model, held_out, config)
    assert after["loss"] < 0.9 * before["loss"]
    assert 0.0 < after["label_mean"] < 1.0


def test_saved_head_loads_onto_the_draft_and_a_wrong_width_is_refused(tmp_path):
    draft = helpers.model(1)
    model = _with_head(draft, 1.5, num_layers=2)
    config = acceptance_distill.HeadTrainConfig(num_layers=2)
    acceptance_distill.save_head(model, tmp_path / "head", config)
    loaded = acceptance_distill.load_head(tmp_path / "head", draft)
    for got, want in zip(jax.tree.leaves(nnx.state(loaded.head, nnx.Param)),
                         jax.tree.leaves(nnx.state(model.head, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="no acceptance head in .*missing"):
        acceptance_distill.load_head(tmp_path / "nothing", draft)
    with pytest.raises(ValueError, match="reads d_model=.*the draft has d_model=48"):
        # (the width is checked before anything is built: a stand-in draft suffices)
        acceptance_distill.load_head(tmp_path / "head", types.SimpleNamespace(
            config=types.SimpleNamespace(d_model=48)))
