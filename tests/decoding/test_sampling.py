"""The token pickers sample from exactly the distributions they claim: processed probability
vectors against hand-computed ones (with the numbers traced, as in the decoding loop), then
empirical frequencies against those vectors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from decoding import sampling
from decoding.sampling import SamplingConfig
from tests import tolerances

LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32))  # token 1 > 3 > 4 > 2 > 0


def _probs(config, logits=LOGITS):
    """The processed distribution as the decoding loop computes it: which filters run is
    static, temperature, k and p are traced."""
    fn = jax.jit(lambda x, values: sampling.probs(x, config.filters.bind(values)))
    return np.asarray(fn(jnp.asarray(logits), config.values()))


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, atol=tolerances.F32, rtol=tolerances.F32)


def test_temperature_only_is_the_tempered_softmax():
    p = np.exp(LOGITS / 0.5)
    _close(_probs(SamplingConfig(temperature=0.5)), p / p.sum())
    _close(_probs(SamplingConfig()), np.exp(LOGITS))


def test_top_k_keeps_the_k_most_likely():
    _close(_probs(SamplingConfig(top_k=2)), np.array([0, 0.4, 0, 0.3, 0]) / 0.7)
    _close(_probs(SamplingConfig(top_k=5)), np.exp(LOGITS))  # k = V is a no-op


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    # Sorted mass: 0.4, 0.7, 0.85, 0.95, 1.0. top_p=0.7 is reached by {1, 3}; 0.71 needs 4 too.
    _close(_probs(SamplingConfig(top_p=0.7)), np.array([0, 0.4, 0, 0.3, 0]) / 0.7)
    _close(_probs(SamplingConfig(top_p=0.71)), np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85)
    _close(_probs(SamplingConfig(top_p=0.1)), np.array([0, 1.0, 0, 0, 0]))


def test_temperature_top_k_top_p_combine_in_order():
    # T=2 flattens to sqrt(p); top_k=4 drops token 0; top_p=0.65 on the renormalised rest.
    config = SamplingConfig(temperature=2.0, top_k=4, top_p=0.65)
    tempered = np.sqrt(np.exp(LOGITS))
    tempered[0] = 0
    tempered /= tempered.sum()        # [0, .336, .168, .291, .206] (sorted: 1, 3, 4, 2)
    keep = np.array([0, 1, 0, 1, 1], bool)  # mass before token 4: .627 < .65, so it is kept
    expected = np.where(keep, tempered, 0)
    _close(_probs(config), expected / expected.sum())


@pytest.mark.parametrize("config", [SamplingConfig(temperature=0.7, top_k=2),
                                    SamplingConfig(top_k=9), SamplingConfig(top_p=0.71),
                                    SamplingConfig(temperature=1.3, top_k=3, top_p=0.9)])
def test_traced_values_equal_the_config_as_constants(config):
    constants = jax.jit(lambda x: sampling.probs(x, config))(jnp.asarray(LOGITS))
    _close(_probs(config), np.asarray(constants))


def test_one_compiled_picker_serves_every_value_of_its_filters():
    filters = SamplingConfig(top_k=2, top_p=0.9).filters
    traces = []
    fn = jax.jit(lambda x, v: (traces.append(1), sampling.probs(x, filters.bind(v)))[1])
    for config in [SamplingConfig(temperature=0.5, top_k=1, top_p=0.5),
                   SamplingConfig(temperature=2.0, top_k=4, top_p=0.99)]:
        _close(np.asarray(fn(jnp.asarray(LOGITS), config.values())), _probs(config))
    assert len(traces) == 1


def test_batched_logits_are_processed_per_row():
    logits = np.stack([LOGITS, LOGITS[::-1]])
    out = _probs(SamplingConfig(top_k=1), logits)
    _close(out, np.array([[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]], np.float32))


def test_greedy_is_argmax():
    assert int(sampling.greedy(jnp.asarray(LOGITS))) == 1
    assert sampling.greedy(jnp.zeros((2, 3, 4))).dtype == jnp.int32


@pytest.mark.parametrize("config", [SamplingConfig(temperature=0.7),
                                    SamplingConfig(temperature=1.3, top_k=3, top_p=0.9)])
def test_samples_follow_the_processed_distribution(config):
    n = 50_000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: sampling.sample(k, jnp.asarray(LOGITS), config)))
    counts = np.bincount(np.asarray(draw(keys)), minlength=LOGITS.size)
    p = _probs(config)
    assert np.all(counts[p == 0] == 0)
    kept = p > 0
    expected = p[kept].astype(np.float64) / p[kept].sum() * n
    _, p_value = stats.chisquare(counts[kept], expected)
    assert p_value > 1e-3, (counts / n, p)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"top_k": -1}, "top_k=-1"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
])
def test_bad_sampling_configs_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)
