"""train/gguf_vocab.py and experiments/export_gguf.py: a model trained here, exported to GGUF
with its tokenizer's vocabulary, reads back (ours and Hugging Face's GGUF readers) with the ids
it was trained on."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("gguf")

from models import convert_gguf, registry  # noqa: E402
from models.transformer import Transformer, TransformerConfig  # noqa: E402
from train import corpus, gguf_vocab  # noqa: E402
from train.pretrained_tokenizer import PretrainedTokenizer  # noqa: E402
from train.tokenizer import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece  # noqa

# (Text spelling a control token, "<eos>", would read back as that token: llama.cpp-style
# tokenizers match specials in the text, the byte tokenizer does not.)
TEXTS = ["def f(x):\n    return x ** 2  # héllo, wörld ✓\n", "\t\x00\x7f  spaces   \r\n"]


def _stdlib_sample(n: int = 6, size: int = 2000) -> list[str]:
    files = sorted(corpus.stdlib_root().glob("*.py"))[:n]
    return [f.read_text(encoding="utf-8", errors="replace")[:size] for f in files]


def _tiny(vocab: int) -> Transformer:
    return registry.construct(Transformer, TransformerConfig(
        vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1), seed=0)


def test_byte_vocabulary_reads_back_as_the_byte_tokenizer(tmp_path):
    path = str(tmp_path / "byte.gguf")
    byte = ByteTokenizer()
    # A padded vocabulary (264 > 260 ids): the extra ids are unused placeholders.
    convert_gguf.save_gguf(_tiny(264), path, vocab=gguf_vocab.gguf_vocab(byte, 264))
    ours = PretrainedTokenizer.from_gguf(path)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="byte.gguf")
    for text in TEXTS + _stdlib_sample():
        assert ours.encode(text) == byte.encode(text)
        # transformers' GGUF loader ignores add_space_prefix=false for SentencePiece-style
        # vocabularies and prepends a space (one extra id 32); llama.cpp honours the flag.
        assert hf.encode(text, add_special_tokens=False) == [32] + byte.encode(text)
        assert ours.decode(byte.encode(text)) == text
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (byte.bos_id, byte.eos_id, byte.pad_id)
    assert ours.encode_prompt("ab") == [byte.bos_id, 97, 98]


def test_sentencepiece_vocabulary_reads_back_with_the_same_ids(tmp_path):
    texts = _stdlib_sample(12, 4000)
    model_path = train_sentencepiece(texts[:8], tmp_path / "spm", vocab_size=400)
    spm = SentencePieceTokenizer(model_path)
    path = str(tmp_path / "spm.gguf")
    convert_gguf.save_gguf(_tiny(spm.vocab_size), path,
                           vocab=gguf_vocab.gguf_vocab(spm, spm.vocab_size))
    ours = PretrainedTokenizer.from_gguf(path)
    for text in texts[8:] + TEXTS[:1]:
        assert ours.encode(text) == spm.encode(text)
    assert (ours.bos_id, ours.eos_id) == (spm.bos_id, spm.eos_id)


def test_vocabulary_larger_than_the_model_is_refused():
    with pytest.raises(ValueError, match="vocab_size=100 is smaller than the tokenizer's 260"):
        gguf_vocab.gguf_vocab(ByteTokenizer(), 100)


def test_export_cli_writes_a_model_and_vocabulary(tmp_path, monkeypatch, capsys):
    import sys
    import types

    from experiments import export_gguf

    model = _tiny(260)
    fake = types.ModuleType("train.checkpoint")
    fake.restore_model = lambda workdir, step=None: (model, "transformer", model.config)
    monkeypatch.setitem(sys.modules, "train.checkpoint", fake)
    out = str(tmp_path / "m.gguf")
    summary = export_gguf.export("wd", out, dtype="f16")
    assert summary["bytes"] == os.path.getsize(out) > 0
    loaded, info = convert_gguf.load_gguf(out)
    assert loaded.config == model.config and info.tensor_types["F16"] > 0
    assert PretrainedTokenizer.from_gguf(out).encode("hi") == [104, 105]
    json.dumps(summary)  # the CLI prints it as JSON
    np.testing.assert_array_equal(  # and the weights are the model's, at f16 precision
        np.asarray(loaded.embed.table[...]),
        np.asarray(model.embed.table[...]).astype(np.float16).astype(np.float32))
