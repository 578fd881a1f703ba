"""The shared decoding loop: plain greedy decoding equals an uncached reference on a ragged
batch, per-row EOS and token budgets, no recompilation within a prompt bucket or for another
max_new_tokens, donation, stats, a plain sampling distribution, and a sampler that commits
tokens out of order (the shape of a masked-diffusion sampler) running unchanged."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

import decoding.generate as generate_lib
from decoding import loop, sampling
from decoding.generate import generate
from decoding.sampling import SamplingConfig
from tests.decoding import helpers

PROMPTS = helpers.PROMPTS
# Other lengths in the same bucket (16), same batch size.
OTHER_PROMPTS = [[4, 4, 2, 1, 9, 9, 3], [5, 6], list(range(10, 23)), [9] * 16]


def test_greedy_equals_the_uncached_reference_and_reuses_compiled_code():
    m = helpers.model()
    first = generate(m, PROMPTS, max_new_tokens=helpers.MAX_NEW, eos_id=helpers.EOS)
    assert first.tokens == helpers.reference_greedy(m, PROMPTS, helpers.MAX_NEW, helpers.EOS)
    traces = dict(loop.TRACE_COUNTS)
    assert traces["prefill"] >= 1 and traces["run"] >= 1

    # Another prompt length in the bucket and another max_new_tokens: no new trace.
    second = generate(m, OTHER_PROMPTS, max_new_tokens=9, eos_id=helpers.EOS)
    assert second.tokens == helpers.reference_greedy(m, OTHER_PROMPTS, 9, helpers.EOS)
    assert dict(loop.TRACE_COUNTS) == traces

    # A prompt past the bucket does compile anew (the counter is live).
    generate(m, [list(range(1, 18))] * 4, max_new_tokens=1)
    assert loop.TRACE_COUNTS["prefill"] == traces["prefill"] + 1
    assert loop.TRACE_COUNTS["run"] == traces["run"] + 1


def test_rows_stop_at_their_own_eos_and_budget():
    m = helpers.model()
    free = generate(m, PROMPTS, max_new_tokens=12).tokens
    eos = free[0][2]          # row 0's third token; the rows reach it at different steps
    out = generate(m, PROMPTS, max_new_tokens=12, eos_id=eos)
    assert out.tokens == helpers.reference_greedy(m, PROMPTS, 12, eos)
    assert any(eos not in row for row in out.tokens), "pick an eos some row never emits"
    for row, full in zip(out.tokens, free):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]
    assert len({len(r) for r in out.tokens}) > 1

    per_row = generate(m, PROMPTS, max_new_tokens=[2, 12, 5, 0])
    assert [len(r) for r in per_row.tokens] == [2, 12, 5, 0]
    assert per_row.tokens == [full[:n] for full, n in zip(free, [2, 12, 5, 0])]


def test_stats_of_plain_decoding():
    out = generate(helpers.model(), PROMPTS, max_new_tokens=[2, 12, 5, 1])
    s = out.stats
    assert s["steps"] == s["target_calls"] == 12 and s["draft_calls"] == 0
    assert s["tokens_per_target_call"] == 1.0
    assert s["accepted_hist"] == [0, 2 + 12 + 5 + 1]
    assert sum(s["committed_per_step"]) == 20 and s["committed_per_step"][:3] == [4, 3, 2]
    assert s["new_tokens"] == [2, 12, 5, 1]
    empty = generate(helpers.model(), PROMPTS, max_new_tokens=0)
    assert empty.tokens == [[], [], [], []] and empty.stats["steps"] == 0


def test_the_state_is_donated_to_the_loop():
    m = helpers.model()
    graph, weights = nnx.split(m)
    sampler = generate_lib.make_sampler("greedy", graph)
    tokens = jnp.zeros((4, 32), jnp.int32).at[:, :2].set(5)
    state = sampler.init({"target": weights}, tokens, jnp.array([2, 2, 2, 2]), jnp.asarray(4),
                         jnp.asarray(-1), jax.random.key(0), prefill_length=16)
    before = state.tokens
    after = loop.run(sampler.step, state, 4, {"target": weights})
    assert before.is_deleted()
    np.testing.assert_array_equal(after.lengths, [6, 6, 6, 6])


def test_plain_sampling_follows_the_processed_distribution():
    m = helpers.model(0, vocab=8, head_scale=10.0)
    config = SamplingConfig(temperature=0.8, top_k=5, top_p=0.95)
    prompt, n = [1, 2, 3], 3000
    out = generate(m, [prompt] * n, sampler="sample", sampling=config, max_new_tokens=1,
                   seed=3)
    counts = np.bincount([t[0] for t in out.tokens], minlength=8)
    p = np.asarray(sampling.probs(jnp.asarray(helpers.next_token_logits(m, [prompt])[0]),
                                  config), np.float64)
    assert np.all(counts[p == 0] == 0)
    kept = p > 0
    assert stats.chisquare(counts[kept], p[kept] / p[kept].sum() * n).pvalue > 1e-3


def test_new_sampling_values_reuse_the_compiled_loop():
    m = helpers.model()
    generate(m, PROMPTS, sampler="sample", max_new_tokens=6, seed=1,
             sampling=SamplingConfig(temperature=0.8, top_k=3, top_p=0.9))
    traces = dict(loop.TRACE_COUNTS)
    # Same filters, other numbers: no new trace, and the new numbers are the ones used
    # (top_k=1 leaves only the argmax, so the samples are the greedy tokens).
    greedy = generate(m, PROMPTS, max_new_tokens=6).tokens
    traces["run"] = loop.TRACE_COUNTS["run"]   # the greedy sampler's own compilation
    narrow = generate(m, PROMPTS, sampler="sample", max_new_tokens=6, seed=1,
                      sampling=SamplingConfig(temperature=1.7, top_k=1, top_p=0.5))
    assert narrow.tokens == greedy
    assert dict(loop.TRACE_COUNTS) == traces
    # Switching a filter off changes the program, and compiles anew.
    generate(m, PROMPTS, sampler="sample", max_new_tokens=6,
             sampling=SamplingConfig(temperature=1.7, top_k=1))
    assert loop.TRACE_COUNTS["run"] == traces["run"] + 1


@dataclasses.dataclass(frozen=True)
class _FillFromTheRight:
    """A model-free stand-in for a masked-diffusion sampler: the generation region starts as
    mask tokens and each step commits the two right-most masked positions, out of order."""
    mask_id: int = 99
    hist_size: int = 4
    cache_slack: int = 0

    def init(self, tokens, prompt_lengths, gen_length):
        positions = jnp.arange(tokens.shape[1])[None, :]
        in_gen = (positions >= prompt_lengths[:, None]) & (
            positions < prompt_lengths[:, None] + gen_length)
        tokens = jnp.where(in_gen, self.mask_id, tokens)
        state = loop.new_state(tokens, prompt_lengths, gen_length, -1, jax.random.key(0),
                               caches={}, hist_size=self.hist_size)
        return state.replace(lengths=prompt_lengths + gen_length, done=jnp.zeros_like(state.done))

    def step(self, state, weights):
        del weights
        positions = jnp.arange(state.tokens.shape[1])[None, :]
        masked = state.tokens == self.mask_id
        rank = jnp.cumsum(masked[:, ::-1], axis=1)[:, ::-1]   # 1 = right-most masked
        commit = masked & (rank <= 2)
        done = jnp.sum(masked & ~commit, axis=1) == 0
        return loop.commit_at(state, positions, commit, done)


def test_an_out_of_order_sampler_runs_on_the_same_loop():
    sampler = _FillFromTheRight()
    tokens = jnp.zeros((2, 16), jnp.int32)
    state = sampler.init(tokens, jnp.array([3, 5]), 5)
    out = loop.run(sampler.step, state, 100)
    np.testing.assert_array_equal(out.tokens[0, 3:8], np.arange(3, 8))
    np.testing.assert_array_equal(out.tokens[1, 5:10], np.arange(5, 10))
    assert bool(jnp.all(out.done)) and int(out.step) == 3
    np.testing.assert_array_equal(out.stats.committed_per_step[:3], [4, 4, 2])


def test_an_array_with_lengths_is_the_same_request_as_ragged_lists():
    m = helpers.model()
    array = np.zeros((len(PROMPTS), 13), np.int32)
    for b, p in enumerate(PROMPTS):
        array[b, :len(p)] = p
    from_array = generate(m, array, prompt_lengths=[len(p) for p in PROMPTS], max_new_tokens=6)
    assert from_array.tokens == generate(m, PROMPTS, max_new_tokens=6).tokens
