"""A tiny random Llama GGUF file with a byte-level vocabulary and a chat template: it stands in
for SmolLM2 where a test exercises the real-model machinery (loading, tokenizers, chat
formatting, HF side by side) rather than the real weights, which take minutes on 2 cores."""
from __future__ import annotations

import pathlib


def write(path: pathlib.Path, head_scale: float = 1.0) -> str:
    """Writes the file at `path` and returns its path as a string; head_scale (as in
    tests.decoding.helpers.model) sharpens its next-token distributions."""
    from models import convert_gguf
    from tests.decoding import helpers
    from train import gguf_vocab
    from train.tokenizer import ByteTokenizer

    vocab = gguf_vocab.gguf_vocab(ByteTokenizer(), 260)
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    convert_gguf.save_gguf(helpers.model(vocab=260, head_scale=head_scale), str(path), vocab=convert_gguf.GGUFVocab(
        **{**vocab.__dict__, "chat_template": template}))
    return str(path)
