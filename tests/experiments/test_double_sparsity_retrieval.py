"""experiments/kv_retrieval.py, the key-value retrieval test of the Double Sparsity reproduction
(arXiv 2408.07092): prompts hold the asked fact before the question, and the shared-prefill,
token-by-token answers equal plain greedy decoding of the whole prompt."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import kv_retrieval
from models import registry
from models.transformer import Transformer
from tests.decoding import helpers


class _Chars:
    """A character tokenizer with a toy chat template (ids < 128)."""

    def encode(self, text):
        return [ord(c) % 128 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def encode_chat(self, messages):
        return self.encode("<u>" + messages[-1]["content"] + "<a>")


def test_prompts_hide_the_asked_fact_before_the_question():
    tok = _Chars()
    prompts = kv_retrieval.make_prompts(tok, trials=3, pairs=4, length=900, seed=1)
    for p in prompts:
        context, question = tok.decode(p.context), tok.decode(p.question)
        word = question.split("magic number for ")[1].split("?")[0]
        assert f"The magic number for {word} is {p.value}." in context
        assert context.count("The magic number for") == 4 and len(p.value) == 4
        assert question.endswith(f"<a>The magic number for {word} is")
        assert abs(len(p.context) + len(p.question) - 900) < 150
    with pytest.raises(ValueError, match="pairs=30 must be in"):
        kv_retrieval.make_prompts(tok, trials=1, pairs=30)


def test_shared_prefill_answers_equal_greedy_decoding():
    """_prefill + _answer (chunked prefill, forced question tokens, greedy answer) equal greedy
    decoding by the full causal forward on the whole prompt (one padded shape, one compile)."""
    model = registry.construct(Transformer, helpers.config(), seed=0)
    prompts = [kv_retrieval.Prompt([i % 60 for i in range(5, 5 + n)], [9, 8, 7][:q], "0")
               for n, q in ((40, 3), (23, 2))]  # ragged contexts and questions
    cache = kv_retrieval._prefill(model, prompts, max_length=64, chunk=16)
    answers = kv_retrieval._answer(model, cache, prompts, answer_tokens=4)
    forward = jax.jit(lambda t: model(t).logits)
    rows = [p.context + p.question for p in prompts]
    for _ in range(4):  # right padding never reaches earlier positions of a causal forward
        padded = np.zeros((2, 48), np.int32)
        for r, row in enumerate(rows):
            padded[r, :len(row)] = row
        logits = np.asarray(forward(jnp.asarray(padded)))
        rows = [row + [int(np.argmax(logits[r, len(row) - 1]))] for r, row in enumerate(rows)]
    for r, p in enumerate(prompts):
        np.testing.assert_array_equal(answers[r], rows[r][-4:])
