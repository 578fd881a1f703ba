"""Tokenizers: byte-level (the default), SentencePiece and pretrained, behind one small protocol.

Every tokenizer exposes the same four special ids so that models and samplers never special-case
the tokenizer: `bos_id` starts a document, `eos_id` ends it, `pad_id` fills packed rows and
prompt buckets, `mask_id` is the masked-diffusion LM's [MASK] token.

Train a SentencePiece model on the embedded standard-library corpus (train split only, so the
validation files stay unseen) with one command:

    python -m train.tokenizer --vocab_size=4096 --output=data/spm/stdlib4096

which writes data/spm/stdlib4096.model (+ .vocab); select it in a gin config with

    make_tokenizer.name = "sentencepiece"
    make_tokenizer.model_path = "data/spm/stdlib4096.model"

A real checkpoint's own tokenizer ("pretrained", train/pretrained_tokenizer.py) is read from its
GGUF file or its Hugging Face tokenizer folder:

    make_tokenizer.name = "pretrained"
    make_tokenizer.gguf_path = "SmolLM2-135M-Instruct.Q4_1.gguf"   # or make_tokenizer.hf_dir = ...
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import time
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import gin
import numpy as np
import sentencepiece as spm

TOKENIZER_NAMES = ("byte", "sentencepiece", "pretrained")
MASK_PIECE = "<mask>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, trainer and samplers need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    mask_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids are skipped."""
        ...

    def token_byte_lengths(self) -> np.ndarray:
        """int32[vocab_size]: UTF-8 bytes each id stands for (0 for specials), for bits/byte."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258, MASK=259 (vocab 260)."""

    vocab_size = 260
    bos_id = 256
    eos_id = 257
    pad_id = 258
    mask_id = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, raw: bytes) -> np.ndarray:
        """Fast path for the data pipeline: tfds hands text features over as UTF-8 bytes."""
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()
        # Specials (and anything out of range) carry no text; a cut multi-byte character
        # decodes to U+FFFD rather than raising, since sampled bytes need not be valid UTF-8.
        kept = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
        return kept.tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, np.int32)
        lengths[:256] = 1
        return lengths

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A trained SentencePiece model that reserves pad/bos/eos ids and a `<mask>` control piece.

    Models from `train_sentencepiece` qualify; a model lacking any of the four specials is
    rejected with an error naming what is missing.
    """

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = str(model_path)
        if not pathlib.Path(self.model_path).is_file():
            raise ValueError(
                f"SentencePiece model {self.model_path!r} does not exist; train one with "
                "`python -m train.tokenizer --vocab_size=4096 --output=data/spm/stdlib4096`")
        self._load(pathlib.Path(self.model_path).read_bytes())

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.pad_id = int(self._sp.pad_id())
        self.mask_id = int(self._sp.piece_to_id(MASK_PIECE))
        missing = [name for name, i in [("bos", self.bos_id), ("eos", self.eos_id),
                                        ("pad", self.pad_id)] if i < 0]
        # piece_to_id answers unk_id for an unknown piece rather than failing.
        if self._sp.id_to_piece(self.mask_id) != MASK_PIECE:
            missing.append(MASK_PIECE)
        if missing:
            raise ValueError(
                f"SentencePiece model {getattr(self, 'model_path', '<proto>')!r} lacks special "
                f"ids {missing}; train it with train.tokenizer.train_sentencepiece, which "
                "reserves pad/bos/eos and a <mask> control piece")

    # Pickling carries the serialized model so grain worker processes can rebuild it.
    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load(state["proto"])

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray)
                                          else ids).ravel()]
        # SentencePiece drops control ids (bos/eos/pad/<mask>) itself; out-of-range ids would
        # make it raise, so they are dropped here.
        return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            if self._sp.is_byte(i):  # byte-fallback pieces <0xNN>
                lengths[i] = 1
            else:
                lengths[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return lengths

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r})"


def encode_document(tokenizer: Tokenizer, text: bytes | str) -> np.ndarray:
    """int32 ids of one document as BOS + tokens + EOS (text may be tfds' UTF-8 bytes)."""
    if isinstance(tokenizer, ByteTokenizer):
        body = tokenizer.encode_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    else:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        body = np.asarray(tokenizer.encode(text), np.int32)
    out = np.empty(body.size + 2, np.int32)
    out[0], out[1:-1], out[-1] = tokenizer.bos_id, body, tokenizer.eos_id
    return out


@gin.configurable
def make_tokenizer(name: str = "byte", **kwargs) -> Tokenizer:
    """Tokenizer by name: "byte" (no arguments), "sentencepiece" (model_path=...) or
    "pretrained" (exactly one of gguf_path=... or hf_dir=...)."""
    if name == "byte":
        if kwargs:
            raise ValueError(f"tokenizer 'byte' takes no arguments, got {sorted(kwargs)}")
        return ByteTokenizer()
    if name == "sentencepiece":
        if set(kwargs) != {"model_path"} or not kwargs["model_path"]:
            raise ValueError("tokenizer 'sentencepiece' needs exactly model_path=<file.model>, "
                             f"got {kwargs}")
        return SentencePieceTokenizer(kwargs["model_path"])
    if name == "pretrained":
        # Imported here: only this kind needs `tokenizers`, jinja2 and (for GGUF) gguf.
        from train.pretrained_tokenizer import PretrainedTokenizer

        given = {k: v for k, v in kwargs.items() if v}
        if set(kwargs) - {"gguf_path", "hf_dir"} or len(given) != 1:
            raise ValueError("tokenizer 'pretrained' needs exactly one of gguf_path=<file.gguf> "
                             f"or hf_dir=<folder with tokenizer.json>, got {kwargs}")
        if "gguf_path" in given:
            return PretrainedTokenizer.from_gguf(given["gguf_path"])
        return PretrainedTokenizer.from_hf_dir(given["hf_dir"])
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {list(TOKENIZER_NAMES)}")


def _training_sentences(texts: Iterable[str | bytes], max_bytes: int) -> Iterator[str]:
    """Cuts documents into chunks of whole lines of at most ~max_bytes.

    SentencePiece silently skips "sentences" longer than max_sentence_length, and most source
    files are longer than any sane limit, so whole documents would mostly be ignored.
    """
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        chunk, size = [], 0
        for line in text.splitlines(keepends=True):
            line = line[:max_bytes // 4]  # a pathological long line still fits in bytes
            n = len(line.encode("utf-8"))
            if chunk and size + n > max_bytes:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += n
        if chunk:
            yield "".join(chunk)


def train_sentencepiece(texts: Iterable[str | bytes], model_prefix: str | os.PathLike, *,
                        vocab_size: int = 4096, model_type: str = "bpe",
                        character_coverage: float = 0.9995, max_sentence_bytes: int = 4096,
                        input_sentence_size: int = 0, seed: int = 0,
                        num_threads: int | None = None) -> str:
    """Trains a SentencePiece model on `texts` and returns the path of `{model_prefix}.model`.

    Settings chosen for source code: identity normalization and no whitespace folding (so
    decode(encode(x)) == x, indentation included), byte fallback (no <unk> ever), whitespace-only
    pieces allowed (indentation runs), no dummy prefix (so per-piece byte lengths are exact).
    BPE is the default: on the stdlib (4096 pieces, 2 cores) it trains in ~15 s and packs
    ~3.5 bytes/token, where unigram takes ~5.5 min for ~3.2-3.4 bytes/token.
    Ids 0..3 are pad, unk, bos, eos and 4 is the `<mask>` control piece. A control piece rather
    than a user-defined one, because a user-defined piece would also be produced for the literal
    text "<mask>", which source code may contain.
    """
    model_prefix = pathlib.Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # The trainer's sampling (input shuffling, seed pieces) draws from this process-wide seed.
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(texts, max_sentence_bytes), model_writer=model,
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, control_symbols=[MASK_PIECE],
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=2 * max_sentence_bytes, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    path = model_prefix.with_name(model_prefix.name + ".model")
    path.write_bytes(model.getvalue())
    # The .vocab text file is what people read to inspect a model; write it like spm does.
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(len(sp)))
    model_prefix.with_name(model_prefix.name + ".vocab").write_text(vocab, encoding="utf-8")
    return str(path)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a SentencePiece model on a text dataset "
                                "(default: the embedded Python stdlib corpus, train split).")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--output", default="data/spm/stdlib4096",
                   help="model prefix: writes OUTPUT.model and OUTPUT.vocab")
    p.add_argument("--dataset", default="python_stdlib")
    p.add_argument("--split", default="train")
    p.add_argument("--feature", default="text")
    p.add_argument("--data_dir", default=None,
                   help="tfds data dir (default: $SWIFTLM_DATA_DIR, else ./data)")
    p.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--max_docs", type=int, default=0, help="0 = every document of the split")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    # Imported here: only the CLI needs the corpus.
    from train import text_source

    args = _parse_args(argv)
    texts = text_source.load_text_source(args.dataset, args.split, args.feature, args.data_dir)
    if args.max_docs:
        texts = texts[:args.max_docs]
    start = time.perf_counter()
    path = train_sentencepiece(iter(texts), args.output, vocab_size=args.vocab_size,
                               model_type=args.model_type)
    seconds = time.perf_counter() - start
    tok = SentencePieceTokenizer(path)
    sample = "".join(t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t
                     for t in texts[:50])
    ids = tok.encode(sample)
    print(json.dumps({"model": path, "vocab_size": tok.vocab_size, "docs": len(texts),
                      "train_seconds": round(seconds, 1),
                      "bytes_per_token_sample": round(len(sample.encode()) / max(len(ids), 1), 3),
                      "roundtrip_exact": tok.decode(ids) == sample}))


if __name__ == "__main__":
    main()
