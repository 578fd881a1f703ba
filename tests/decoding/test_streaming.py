"""generate(on_chunk=...): streamed decoding returns what one loop call returns, hands over
growing prefixes a chunk of steps at a time through the one compiled loop; and several
end-of-sequence ids (a chat model's end-of-turn and end-of-text) each end a row."""
import pytest

from decoding import loop
from decoding.generate import generate
from tests.decoding import helpers


@pytest.mark.parametrize("sampler", ["greedy", "ngram_greedy"])
def test_streamed_tokens_equal_one_call_and_grow_chunk_by_chunk(sampler):
    model = helpers.model()
    plain = generate(model, helpers.PROMPTS, sampler=sampler, max_new_tokens=helpers.MAX_NEW)
    chunks = []
    traces = dict(loop.TRACE_COUNTS)
    streamed = generate(model, helpers.PROMPTS, sampler=sampler,
                        max_new_tokens=helpers.MAX_NEW, on_chunk=chunks.append, chunk_steps=3)
    assert streamed.tokens == plain.tokens
    assert streamed.stats["steps"] == plain.stats["steps"]
    # One chunk per 3 steps (the last may be shorter), each a prefix of the next.
    assert len(chunks) == -(-plain.stats["steps"] // 3)
    for before, after in zip(chunks, chunks[1:]):
        for row_before, row_after in zip(before, after):
            assert row_after[:len(row_before)] == row_before
    assert chunks[-1] == plain.tokens
    # The chunks reuse the compiled loop that the plain call built.
    assert loop.TRACE_COUNTS["run"] == traces.get("run", 0)


def test_streaming_needs_a_positive_chunk():
    with pytest.raises(ValueError, match="chunk_steps=0 must be at least 1"):
        generate(helpers.model(), helpers.PROMPTS, max_new_tokens=4, on_chunk=print,
                 chunk_steps=0)


def test_any_of_several_eos_ids_ends_a_row():
    model = helpers.model()
    free = generate(model, helpers.PROMPTS, max_new_tokens=helpers.MAX_NEW).tokens
    # Stop ids taken from what the rows really generate: row 0's third token and row 1's
    # fifth; each row must stop at the first of them that it emits.
    stops = [free[0][2], free[1][4]]
    out = generate(model, helpers.PROMPTS, max_new_tokens=helpers.MAX_NEW, eos_id=stops).tokens
    for row, full in zip(out, free):
        hits = [i for i, t in enumerate(full) if t in stops]
        expected = full[:hits[0] + 1] if hits else full
        assert row == expected
    with pytest.raises(ValueError, match=r"eos_id=\[\] must be a token id"):
        generate(model, helpers.PROMPTS, max_new_tokens=4, eos_id=[])
