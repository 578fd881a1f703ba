"""Bad requests fail before any compilation with a ValueError naming the bad value and, where
there is a choice, the valid ones (a sampling sampler driven by hand without its values fails
while tracing, before anything runs)."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from decoding import generate as generate_lib
from decoding import loop
from decoding.generate import generate
from decoding.sampling import SamplingConfig
from decoding.speculative import FlyConfig, SelfSpecConfig, SpeculativeConfig
from tests.decoding import helpers


def test_prompt_longer_than_the_cache():
    with pytest.raises(ValueError, match=r"prompt 1 has 10 tokens.*max_length=8"):
        generate(helpers.model(), [[1, 2], list(range(10))], max_length=8)


def test_empty_prompt_and_empty_batch():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(helpers.model(), [[1, 2], []])
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(helpers.model(), [])


def test_token_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"token id 64.*\[0, 64\)"):
        generate(helpers.model(), [[1, 64]])


def test_draft_with_another_vocabulary():
    with pytest.raises(ValueError, match=r"draft model vocab_size=8.*vocab_size=64"):
        generate(helpers.model(), [[1, 2]], sampler="speculative_greedy",
                 draft_model=helpers.model(0, vocab=8))


def test_unknown_sampler_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown sampler 'beam'.*'speculative_greedy'"):
        generate(helpers.model(), [[1, 2]], sampler="beam")


def test_non_positive_temperature_where_sampling_is_asked():
    with pytest.raises(ValueError, match=r"temperature=0.0.*greedy"):
        generate(helpers.model(), [[1, 2]], sampler="sample",
                 sampling=SamplingConfig(temperature=0.0))
    with pytest.raises(ValueError, match=r"temperature=-0.5"):
        SamplingConfig(temperature=-0.5)


def test_mismatched_sampler_arguments():
    m = helpers.model()
    with pytest.raises(ValueError, match="'speculative' needs a draft model"):
        generate(m, [[1, 2]], sampler="speculative")
    with pytest.raises(ValueError, match="'ngram_greedy' takes no draft model"):
        generate(m, [[1, 2]], sampler="ngram_greedy", draft_model=m)
    with pytest.raises(ValueError, match="'greedy' is greedy and takes no sampling config"):
        generate(m, [[1, 2]], sampler="greedy", sampling=SamplingConfig())
    with pytest.raises(ValueError, match="'fly' needs a FlyConfig, got SpeculativeConfig"):
        generate(m, [[1, 2]], sampler="fly", draft_model=m, config=SpeculativeConfig())
    with pytest.raises(ValueError, match=r"max_new_tokens=-1"):
        generate(m, [[1, 2]], max_new_tokens=-1)
    with pytest.raises(ValueError, match=r"max_new_tokens=\[1, 2\].*one per prompt \(1\)"):
        generate(m, [[1, 2]], max_new_tokens=[1, 2])


def test_bad_sampler_configs_name_the_value():
    with pytest.raises(ValueError, match="gamma=0"):
        SpeculativeConfig(gamma=0)
    with pytest.raises(ValueError, match="window=-1"):
        FlyConfig(window=-1)
    assert set(generate_lib.SAMPLERS) >= {"greedy", "sample", "speculative",
                                          "speculative_greedy", "ngram", "ngram_greedy", "fly",
                                          "self_spec", "self_spec_greedy"}


def test_self_speculation_takes_only_a_matching_adapter_as_its_draft():
    m = helpers.model()
    with pytest.raises(ValueError, match="takes an EarlyExitAdapter as its draft model, got "
                                         "Transformer"):
        generate(m, [[1, 2]], sampler="self_spec_greedy", draft_model=helpers.model(1))
    with pytest.raises(ValueError, match="trained on exit_layer=1, but the sampler exits at "
                                         "exit_layer=2"):
        generate(m, [[1, 2]], sampler="self_spec_greedy", draft_model=helpers.adapter(m),
                 config=SelfSpecConfig(exit_layer=2))


def test_sampling_sampler_run_without_its_values():
    # Driving the loop by hand: a sampling sampler's numbers must come in the loop inputs.
    graph, weights = nnx.split(helpers.model())
    sampler = generate_lib.make_sampler("sample", graph)
    tokens = jnp.zeros((1, 32), jnp.int32).at[:, :2].set(5)
    state = sampler.init({"target": weights}, tokens, jnp.array([2]), jnp.asarray(4),
                         jnp.asarray(-1), jax.random.key(0), prefill_length=16)
    with pytest.raises(ValueError, match=r"under 'sampling'.*got keys \['target'\]"):
        loop.run(sampler.step, state, 4, {"target": weights})
    inputs = {"target": weights, **generate_lib.sampling_inputs("sample", None)}
    assert int(loop.run(sampler.step, state, 4, inputs).lengths[0]) == 6
