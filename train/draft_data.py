"""Training data of the distilled draft (train/draft_distill.py; speculative decoding, arXiv
2211.17192): chat-formatted rows made from the corpus's training-split code, through the
target tokenizer's chat template (train/chat_template.py via `encode_chat`), mixed into the
corpus batches, so the draft also sees the turn markers an instruct target answers after."""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np

Batch = dict[str, np.ndarray]


def _chat_docs(tokenizer, seed: int, limit: int) -> list[list[int]]:
    from train import corpus

    root = corpus.stdlib_root()
    files = [p for p in corpus.list_stdlib_files(root) if corpus.split_of(p) == "train"
             and "/test" not in f"/{p}"]
    rng = random.Random(seed)
    rng.shuffle(files)
    docs: list[list[int]] = []
    for path in files:
        try:
            text = corpus.read_source(root / path)
        except (ValueError, UnicodeDecodeError):
            continue
        # Short chunks of a file stand in for "functions": what matters is the target's
        # distribution after chat turn markers, not the exact unit of code.
        lines = text.splitlines()
        for start in range(0, max(len(lines) - 8, 1), 40):
            code = "\n".join(lines[start:start + rng.randint(6, 16)]).strip("\n")
            if len(code) < 80:
                continue
            ask = rng.choice(["Write this Python code again, unchanged:\n```python\n"
                              f"{code}\n```",
                              f"Continue this Python code:\n{code.split(chr(10))[0]}",
                              "Explain what this Python code does:\n" + code])
            messages = [{"role": "user", "content": ask},
                        {"role": "assistant", "content": f"```python\n{code}\n```"}]
            docs.append(tokenizer.encode_chat(messages, add_generation_prompt=False))
            if len(docs) >= limit:
                return docs
    return docs


def chat_batches(tokenizer, *, seed: int, batch_size: int, seq_len: int) -> Iterator[Batch]:
    """Endless batches (train/data.py's keys) of chat-formatted documents, one per row,
    truncated or padded to seq_len."""
    docs = _chat_docs(tokenizer, seed, limit=4096)
    if not docs:
        raise ValueError("no chat documents could be built from the corpus's training split")
    rng = np.random.default_rng(seed)
    L, pad = seq_len, tokenizer.pad_id or 0
    while True:
        rows = [docs[i] for i in rng.integers(0, len(docs), batch_size)]
        inputs = np.full((batch_size, L), pad, np.int32)
        mask = np.zeros((batch_size, L), np.int32)
        for r, ids in enumerate(rows):
            ids = ids[:L + 1]
            inputs[r, :len(ids) - 1] = ids[:-1]
            mask[r, :len(ids) - 1] = 1
        positions = np.broadcast_to(np.arange(L, dtype=np.int32), (batch_size, L))
        yield {"inputs": inputs, "segment_ids": mask.copy(), "positions": positions.copy(),
               "loss_mask": mask}


def mixed_batches(corpus_batches: Iterator[Batch], chat: Iterator[Batch] | None,
                  chat_every: int) -> Iterator[Batch]:
    """Corpus batches with every chat_every-th one replaced by a chat batch."""
    for step in range(1, 1 << 62):
        if chat is not None and chat_every and step % chat_every == 0:
            yield next(chat)
        else:
            yield next(corpus_batches)
