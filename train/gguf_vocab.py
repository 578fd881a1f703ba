"""The vocabulary of a tokenizer trained here, in GGUF's terms, so a model exported with
models/convert_gguf.save_gguf runs in llama.cpp with the ids it was trained on.

* The byte tokenizer becomes a SentencePiece-style ("llama") vocabulary of the 256 byte pieces
  <0x00>..<0xFF> at ids 0..255 and nothing else, so byte fallback (llama.cpp's, `tokenizers'`)
  encodes any text to exactly the byte ids (but for a literal U+2581 in the text, which
  SentencePiece reads as a space); BOS, EOS, PAD and MASK follow as control tokens.
  (A byte-level BPE with no merges would say the same, but GGUF cannot store an empty merge
  list and llama.cpp refuses a "gpt2" vocabulary without one.)
* A SentencePiece model trained by train.tokenizer becomes a "llama" vocabulary: its pieces,
  scores and piece types, with the settings it was trained with (no dummy prefix).

Ids past the tokenizer's (a model whose vocab_size was padded) are unused control tokens.
"""
from __future__ import annotations

from models.convert_gguf import GGUFVocab
from train.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer

# gguf.TokenType values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _padded(tokens: list[str], types: list[int], scores: list[float] | None,
            vocab_size: int) -> tuple[list[str], list[int], list[float] | None]:
    if vocab_size < len(tokens):
        raise ValueError(f"model vocab_size={vocab_size} is smaller than the tokenizer's "
                         f"{len(tokens)} ids")
    extra = vocab_size - len(tokens)
    tokens = tokens + [f"<unused_{i}>" for i in range(extra)]
    types = types + [UNUSED] * extra
    if scores is not None:
        scores = scores + [0.0] * extra
    return tokens, types, scores


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of `tokenizer` for a model with `vocab_size` ids."""
    if isinstance(tokenizer, ByteTokenizer):
        tokens = [f"<0x{b:02X}>" for b in range(256)] + ["<bos>", "<eos>", "<pad>", "<mask>"]
        types = [BYTE] * 256 + [CONTROL] * 4
        # SentencePiece tokenizers write every space as U+2581 before looking pieces up, so
        # the space byte is spelled that way (as a normal piece) to keep id 32.
        tokens[ord(" ")], types[ord(" ")] = "\u2581", NORMAL
        tokens, types, scores = _padded(tokens, types, [0.0] * len(tokens), vocab_size)
        return GGUFVocab(model="llama", tokens=tokens, token_types=types, scores=scores,
                         bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id, add_bos=True, add_space_prefix=False)
    if isinstance(tokenizer, SentencePieceTokenizer):
        sp = tokenizer._sp
        tokens, types, scores = [], [], []
        for i in range(sp.get_piece_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(float(sp.get_score(i)))
            types.append(CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i)
                         else BYTE if sp.is_byte(i) else NORMAL)
        tokens, types, scores = _padded(tokens, types, scores, vocab_size)
        return GGUFVocab(model="llama", tokens=tokens, token_types=types, scores=scores,
                         bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id, unk_id=int(sp.unk_id()), add_bos=True,
                         add_space_prefix=False)
    raise ValueError(f"no GGUF vocabulary for {tokenizer!r}; valid: ByteTokenizer, "
                     "SentencePieceTokenizer")
