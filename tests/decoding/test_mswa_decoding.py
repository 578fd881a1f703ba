"""The shared loop decodes MSWA (ring-buffer caches) correctly: a ragged batch gives each row
what it gets alone, and greedy speculative decoding with an MSWA target equals plain greedy."""
import numpy as np
import pytest

from decoding.generate import generate
from decoding.speculative.draft_model import SpeculativeConfig
from models import registry
from models.mswa import MSWA, MSWAConfig
from tests.decoding import helpers

# Windows of 1..8 previous tokens (+ margin 8): prompts of up to 13 tokens and 16 new ones
# wrap the rings during prefill and decoding.
CONFIG = MSWAConfig(vocab_size=helpers.VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    base_window=2, head_multipliers=(0.5, 1.0, 1.5, 2.0),
                    layer_multipliers=(1.0, 2.0), rewind_margin=8)


def _mswa():
    return registry.construct(MSWA, CONFIG, seed=0)


def test_ragged_batch_equals_rows_decoded_alone():
    model = _mswa()
    batch = generate(model, helpers.PROMPTS, sampler="greedy", max_new_tokens=helpers.MAX_NEW)
    for row, prompt in enumerate(helpers.PROMPTS):
        alone = generate(model, [prompt], sampler="greedy", max_new_tokens=helpers.MAX_NEW)
        np.testing.assert_array_equal(np.asarray(batch.tokens[row]), np.asarray(alone.tokens[0]))


def test_speculative_greedy_with_mswa_target_equals_plain_greedy():
    target, draft = _mswa(), helpers.model(seed=1)
    plain = generate(target, helpers.PROMPTS, sampler="greedy", max_new_tokens=helpers.MAX_NEW)
    spec = generate(target, helpers.PROMPTS, sampler="speculative_greedy", draft_model=draft,
                    max_new_tokens=helpers.MAX_NEW)
    for a, b in zip(plain.tokens, spec.tokens):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gamma_beyond_the_rewind_margin_is_refused():
    with pytest.raises(ValueError, match="rewind_margin=8"):
        generate(_mswa(), helpers.PROMPTS, sampler="speculative_greedy",
                 draft_model=helpers.model(seed=1), config=SpeculativeConfig(gamma=12),
                 max_new_tokens=4)
