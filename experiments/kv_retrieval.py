"""Key-value retrieval from a long prompt: can a chat model (and a sparse decode path) find one
value among many?

A prompt hides `pairs` random facts "The magic number for <word> is <4 digits>." at random
depths of filler text (the passkey-retrieval format of Mohtashami & Jaggi 2023, arXiv
2305.16300, with several keys as in LongEval's line retrieval, which Double Sparsity, arXiv
2408.07092, evaluates), about `length` tokens in all, in one user turn of the model's chat
template. The question asks for one key, and the assistant turn is opened with "The magic
number for <word> is" so that a greedy 135M model answers with the number rather than a
sentence about it. Correct = the first number of the greedy answer equals the value.

Cost: the long context is prefilled once per prompt (densely, in chunks), and every decoding
variant then continues from that same cache: the question and the answer are decoded one token
at a time (the question tokens forced), which is where a sparse decode path differs.

    prompts = make_prompts(tokenizer, trials=8, pairs=8, length=2048)
    result = evaluate({"dense": m1, "1/8": m8}, prompts, tokenizer.decode)
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WORDS = ("apple", "river", "candle", "pepper", "violin", "marble", "garden", "rocket",
         "pencil", "falcon", "silver", "window", "harbor", "copper", "meadow", "lantern",
         "walnut", "glacier", "saddle", "tunnel", "orchid", "bucket", "cactus", "anchor")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")


@dataclasses.dataclass(frozen=True)
class Prompt:
    context: list[int]   # prefilled: the chat prefix, filler and facts
    question: list[int]  # decoded token by token: the question and the answer's opening
    value: str           # the expected answer


def make_prompts(tokenizer, trials: int, pairs: int = 8, length: int = 2048,
                 seed: int = 0) -> list[Prompt]:
    """`trials` prompts of about `length` tokens, each with `pairs` facts and one question."""
    if not 1 <= pairs <= len(WORDS):
        raise ValueError(f"pairs={pairs} must be in [1, {len(WORDS)}] (distinct key words)")
    rng = np.random.default_rng(seed)
    filler_tokens = len(tokenizer.encode(FILLER))
    prompts = []
    for _ in range(trials):
        keys = rng.choice(WORDS, pairs, replace=False)
        values = rng.integers(1000, 10000, pairs)
        facts = [f"The magic number for {k} is {v}. " for k, v in zip(keys, values)]
        fact_tokens = sum(len(tokenizer.encode(f)) for f in facts)
        repeats = max(pairs + 1, (length - fact_tokens - 60) // filler_tokens)  # 60: the rest
        slots = np.sort(rng.choice(np.arange(1, repeats), pairs, replace=False))
        text, fact = [], 0
        for i in range(repeats):
            while fact < pairs and slots[fact] == i:
                text.append(facts[fact])
                fact += 1
            text.append(FILLER)
        ask = int(rng.integers(pairs))
        body = ("There are magic numbers hidden in the text below. Remember them.\n\n"
                + "".join(text))
        question = f"\n\nWhat is the magic number for {keys[ask]}?"
        full = tokenizer.encode_chat([{"role": "user", "content": body + question}])
        full += tokenizer.encode(f"The magic number for {keys[ask]} is")
        head = tokenizer.encode_chat([{"role": "user", "content": body}])
        split = 0  # the longest common prefix: the context ends where the question begins
        while split < min(len(full), len(head)) and full[split] == head[split]:
            split += 1
        prompts.append(Prompt(full[:split], full[split:], str(values[ask])))
    return prompts


_extend = nnx.jit(lambda m, t, c, n: m.extend(t, c, num_tokens=n))
_step = nnx.jit(lambda m, t, c: m.extend(t, c))


def _prefill(model, group: list[Prompt], max_length: int, chunk: int):
    """A cache holding each prompt's context, filled densely `chunk` tokens at a time (a
    [B, chunk, chunk + cache] attention instead of one [B, T, T] of the whole context)."""
    n, t = len(group), max(len(p.context) for p in group)
    tokens = np.zeros((n, -(-t // chunk) * chunk), np.int32)
    for i, p in enumerate(group):
        tokens[i, :len(p.context)] = p.context
    lengths = np.array([len(p.context) for p in group])
    cache = model.init_cache(n, max_length)
    for a in range(0, t, chunk):
        count = np.clip(lengths - a, 0, chunk).astype(np.int32)
        _, cache = _extend(model, jnp.asarray(tokens[:, a:a + chunk]), cache,
                           jnp.asarray(count))
    return cache


def _answer(model, cache, group: list[Prompt], answer_tokens: int) -> np.ndarray:
    """Greedy answers [B, answer_tokens]: the question tokens are forced one step each."""
    n = len(group)
    q_len = np.array([len(p.question) for p in group])
    out = np.zeros((n, answer_tokens), np.int32)
    prev = np.zeros(n, np.int32)
    for i in range(int(q_len.max()) + answer_tokens - 1):
        tok = np.array([p.question[i] if i < len(p.question) else prev[r]
                        for r, p in enumerate(group)], np.int32)
        logits, cache = _step(model, jnp.asarray(tok[:, None]), cache)
        prev = np.asarray(jnp.argmax(logits[:, -1], axis=-1)).astype(np.int32)
        pos = i + 1 - q_len  # index of the answer token just predicted, per row
        for r in np.nonzero((pos >= 0) & (pos < answer_tokens))[0]:
            out[r, pos[r]] = prev[r]
    return out


def evaluate(models: dict, prompts: list[Prompt], decode, *, batch: int = 4,
             answer_tokens: int = 7, chunk: int = 512) -> dict:
    """Accuracy per named model. The first model prefills each batch of prompts; every model
    continues from that cache, so all must share its cache layout (the same label channels
    and bits for double-sparse models, whose prefill is dense)."""
    names = list(models)
    max_length = max(len(p.context) + len(p.question) for p in prompts) + answer_tokens
    max_length = -(-max_length // chunk) * chunk
    correct = {name: 0 for name in names}
    examples = {name: [] for name in names}
    for s in range(0, len(prompts), batch):
        group = prompts[s:s + batch]
        cache = _prefill(models[names[0]], group, max_length, chunk)
        layout = jax.tree.map(lambda x: (x.shape, x.dtype), cache)
        for name in names:
            shapes = jax.eval_shape(lambda m=models[name]: m.init_cache(len(group), max_length))
            if jax.tree.map(lambda x: (x.shape, x.dtype), shapes) != layout:
                raise ValueError(f"model {name!r} has another cache layout than "
                                 f"{names[0]!r}; retrieval shares one prefill")
            answers = _answer(models[name], cache, group, answer_tokens)
            for row, p in enumerate(group):
                text = decode(answers[row].tolist())
                found = re.findall(r"\d+", text)
                correct[name] += bool(found) and found[0] == p.value
                if len(examples[name]) < 4:
                    examples[name].append({"value": p.value, "answer": text.strip()})
    return {name: {"accuracy": correct[name] / len(prompts), "trials": len(prompts),
                   "examples": examples[name],
                   "context_tokens": int(np.mean([len(p.context) for p in prompts]))}
            for name in names}
