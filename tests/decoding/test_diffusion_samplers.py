"""Masked-diffusion samplers on the shared loop (decoding/diffusion/): every sampler ends and
commits at least one token per active row per step, NFE accounting, FreeDave reproduces the
one-token-per-step baseline exactly with fewer forwards, Prophet's early commit, Learn2PD's
filter (in the loop, its oracle data and its fit), and the request checks. A tiny
random-weight model suffices for exactness and accounting."""
import jax
import numpy as np
import pytest

from decoding.diffusion import DiffusionSamplerConfig, learn2pd, learn2pd_train
from decoding.generate import generate
from models import registry
from models.diffusion import DiffusionConfig
from tests.decoding import helpers

MASK, EOS = 63, 2
CONFIG = DiffusionConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                         mask_token_id=MASK)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]   # ragged
GEN = 16


@pytest.fixture(scope="module")
def model():
    return registry.build("diffusion", CONFIG, seed=0)


@pytest.fixture(scope="module")
def baseline(model):
    return generate(model, PROMPTS, sampler="llada", max_new_tokens=GEN,
                    config=DiffusionSamplerConfig(block_length=8))


def _check_accounting(out, *, extra_forwards=0):
    s = out.stats
    hist = np.asarray(s["accepted_hist"])
    assert hist[0] == 0                         # no active row-step committed nothing
    assert s["target_calls"] == s["steps"] + extra_forwards
    assert s["row_forwards"] == hist.sum() + extra_forwards * len(PROMPTS)
    assert sum(s["committed_per_step"]) == len(PROMPTS) * GEN
    assert all(len(t) == GEN for t in out.tokens)
    assert not any(MASK in t for t in out.tokens)


def test_baseline_commits_one_token_per_row_per_step(baseline):
    _check_accounting(baseline)
    assert baseline.stats["steps"] == GEN
    assert baseline.stats["committed_per_step"] == [len(PROMPTS)] * GEN


def test_freedave_reproduces_the_baseline_with_fewer_forwards(model, baseline):
    out = generate(model, PROMPTS, sampler="freedave", max_new_tokens=GEN,
                   config=DiffusionSamplerConfig(block_length=8, draft_steps=4))
    assert out.tokens == baseline.tokens
    _check_accounting(out, extra_forwards=1)
    assert out.stats["target_calls"] < baseline.stats["target_calls"]


@pytest.mark.parametrize("sampler,config", [
    # Options ride on any rule: threshold with the prefix cache, LocalLeap with the dual
    # cache and the end-of-text stop, random remasking with a 3-step schedule.
    ("fast_dllm", DiffusionSamplerConfig(block_length=8, threshold=0.0, cache="prefix")),
    ("localleap", DiffusionSamplerConfig(block_length=8, kappa=0.0, tau=0.0, radius=1,
                                         cache="dual", eot_stop=True)),
    ("llada_random", DiffusionSamplerConfig(block_length=8, steps_per_block=3)),
])
def test_every_sampler_ends_and_commits_at_least_one_token_per_step(model, sampler, config):
    out = generate(model, PROMPTS, sampler=sampler, max_new_tokens=GEN, config=config,
                   eos_id=None if sampler != "localleap" else 3)
    s = out.stats
    hist = np.asarray(s["accepted_hist"])
    assert hist[0] == 0 and s["target_calls"] == s["steps"] <= GEN
    assert s["row_forwards"] == hist.sum()
    assert not any(MASK in t for t in out.tokens)
    if sampler == "llada_random":   # ceil-first schedule 3, 3, 2 per block of 8
        assert s["steps"] == 6 and s["committed_per_step"][:3] == [6, 6, 4]
    else:   # thresholds of 0 commit a whole block per step
        assert s["steps"] == GEN // 8


def test_prophet_commits_everything_once_the_gap_clears(model, baseline):
    now = generate(model, PROMPTS, sampler="prophet", max_new_tokens=GEN,
                   config=DiffusionSamplerConfig(block_length=8,
                                                 prophet_thresholds=(0.0, 0.0, 0.0)))
    assert now.stats["steps"] == 1 and now.stats["early_commits"] == len(PROMPTS)
    assert now.stats["early_commit_steps"] == len(PROMPTS)
    assert all(len(t) == GEN and MASK not in t for t in now.tokens)


def test_bad_requests_name_the_value(model):
    with pytest.raises(ValueError, match="MASK token id 63"):
        generate(model, [[1, 2, MASK]], sampler="llada", max_new_tokens=16)
    with pytest.raises(ValueError, match="max_new_tokens=12.*block_length=8"):
        generate(model, PROMPTS, sampler="fast_dllm", max_new_tokens=12,
                 config=DiffusionSamplerConfig(block_length=8))
    for field in ("threshold", "kappa", "tau", "filter_threshold"):
        with pytest.raises(ValueError, match=f"{field}=1.5 must be a probability"):
            DiffusionSamplerConfig(**{field: 1.5})
    with pytest.raises(ValueError, match="threshold=-0.1"):
        DiffusionSamplerConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="steps_per_block=9"):
        DiffusionSamplerConfig(block_length=8, steps_per_block=9)
    with pytest.raises(ValueError, match="freedave.*cache"):
        generate(model, PROMPTS, sampler="freedave", max_new_tokens=16,
                 config=DiffusionSamplerConfig(block_length=8, cache="dual"))
    with pytest.raises(ValueError, match="needs a causal model"):
        generate(model, PROMPTS, sampler="greedy", max_new_tokens=4)
    with pytest.raises(ValueError, match="masked diffusion model"):
        generate(helpers.model(), PROMPTS, sampler="llada", max_new_tokens=16)


def _filter_file(tmp_path, bias: float, block_length: int = 8) -> str:
    """A filter whose output is `bias` everywhere (accepts all or nothing)."""
    params = learn2pd_train.init_params(block_length, 4, jax.random.key(0))
    params = {**params, "w2": params["w2"] * 0, "b2": params["b2"] + bias}
    path = str(tmp_path / f"filter{bias}.npz")
    learn2pd.save_filter(path, learn2pd.Filter.from_params(params))
    return path


def test_learn2pd_runs_in_the_loop_and_always_commits(model, baseline, tmp_path):
    # A filter that accepts nothing leaves the baseline's top-1 commit: its exact output.
    config = DiffusionSamplerConfig(block_length=8, learn2pd_filter=_filter_file(tmp_path, -30))
    none = generate(model, PROMPTS, sampler="learn2pd", max_new_tokens=GEN, config=config)
    assert none.tokens == baseline.tokens
    _check_accounting(none)
    # One that accepts everything commits each whole block in one step.
    config = DiffusionSamplerConfig(block_length=8, learn2pd_filter=_filter_file(tmp_path, 30))
    every = generate(model, PROMPTS, sampler="learn2pd", max_new_tokens=GEN, config=config)
    _check_accounting(every)
    assert every.stats["steps"] == GEN // 8
    with pytest.raises(ValueError, match="needs a trained filter"):
        generate(model, PROMPTS, sampler="learn2pd", max_new_tokens=GEN,
                 config=DiffusionSamplerConfig(block_length=8))
    with pytest.raises(ValueError, match="blocks of 8 positions, but block_length=16"):
        generate(model, PROMPTS, sampler="learn2pd", max_new_tokens=GEN,
                 config=DiffusionSamplerConfig(block_length=16,
                                               learn2pd_filter=config.learn2pd_filter))


def test_learn2pd_oracle_data_and_filter_fit(model, baseline):
    conf, labels = learn2pd_train.oracle_data(model, PROMPTS, baseline.tokens, GEN, 8, EOS)
    # One sample per oracle step and active row; the oracle commits >= 1 token per step.
    assert conf.shape == labels.shape and conf.shape[1] == 8
    assert len(PROMPTS) * GEN // 8 <= len(conf) <= len(PROMPTS) * GEN
    assert np.all((conf >= 0) & (conf <= 1)) and labels.dtype == bool
    # The fit learns a rule the data follow (final iff confident) on fresh samples.
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(400, 8)).astype(np.float32)
    filt, metrics = learn2pd_train.train_filter(x, x > 0.5, steps=300, lr=3e-2)
    assert metrics["test_accuracy"] > 0.9 and filt.block_length == 8
