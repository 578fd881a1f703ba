"""Tests for train/tokenizer.py: byte and SentencePiece tokenizers, the factory and the CLI."""
import json
import pickle

import gin
import numpy as np
import pytest
import sentencepiece as spm

from tests.train.test_data import make_fake_stdlib
from train import corpus
from train.tokenizer import (ByteTokenizer, SentencePieceTokenizer, Tokenizer, encode_document,
                             main, make_tokenizer, train_sentencepiece)

TEXTS = ["plain ascii", "héllo wörld ✓ 漢字 🐍", "def f(x):\n\treturn x  # <mask>\n", ""]


def test_byte_roundtrip_and_specials():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (
        260, 256, 257, 258, 259)
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.mask_id]) == text
        assert tok.decode(np.asarray(ids)) == text


def test_byte_invalid_utf8_and_byte_lengths():
    tok = ByteTokenizer()
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut 3-byte character
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (260,) and lengths[:256].sum() == 256 and lengths[256:].sum() == 0


def test_encode_document_adds_bos_eos():
    tok = ByteTokenizer()
    doc = encode_document(tok, "é".encode())
    assert doc.dtype == np.int32 and doc.tolist() == [256, 0xC3, 0xA9, 257]
    assert encode_document(tok, "é").tolist() == doc.tolist()


def test_make_tokenizer_errors_name_the_bad_value(tmp_path):
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"'wordpiece'.*\['byte', 'sentencepiece', 'pretrained'\]"):
        make_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="model_path"):
        make_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="no arguments"):
        make_tokenizer("byte", model_path="x.model")
    with pytest.raises(ValueError, match="does not exist"):
        make_tokenizer("sentencepiece", model_path=str(tmp_path / "missing.model"))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    # A few hundred pieces over two real stdlib modules trains in well under a second.
    texts = [(corpus.stdlib_root() / name).read_text(encoding="utf-8")
             for name in ("textwrap.py", "json/decoder.py")]
    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    return train_sentencepiece(texts, prefix, vocab_size=400, num_threads=1)


def test_sentencepiece_roundtrip_specials_and_bytes(sp_model):
    tok = make_tokenizer("sentencepiece", model_path=sp_model)
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 400
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 2, 3, 4)
    lengths = tok.token_byte_lengths()
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # identity normalization + byte fallback: exact
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.mask_id]) == text
        assert lengths[ids].sum() == len(text.encode("utf-8"))
    # "<mask>" in text is ordinary text, never the reserved id.
    assert tok.mask_id not in tok.encode("<mask>")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_gin_selects_the_tokenizer(sp_model):
    try:
        gin.parse_config(f"make_tokenizer.name = 'sentencepiece'\n"
                         f"make_tokenizer.model_path = '{sp_model}'")
        assert isinstance(make_tokenizer(), SentencePieceTokenizer)
    finally:
        gin.clear_config()
    assert isinstance(make_tokenizer(), ByteTokenizer)


def test_sentencepiece_model_without_specials_is_rejected(tmp_path):
    path = tmp_path / "plain.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=f,
                                       vocab_size=60, minloglevel=2, hard_vocab_limit=False)
    with pytest.raises(ValueError, match=r"lacks special ids \['pad', '<mask>'\]"):
        SentencePieceTokenizer(path)


def test_cli_trains_on_the_corpus(tmp_path, capsys):
    root, data_dir = tmp_path / "stdlib", tmp_path / "data"
    make_fake_stdlib(root)
    corpus.build_stdlib_dataset(data_dir, root=root)  # the CLI then reuses this build
    output = tmp_path / "spm" / "fake"
    main([f"--data_dir={data_dir}", f"--output={output}", "--vocab_size=400"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == f"{output}.model" and report["roundtrip_exact"]
    assert (tmp_path / "spm" / "fake.vocab").is_file()
    assert make_tokenizer("sentencepiece", model_path=report["model"]).vocab_size == 400
