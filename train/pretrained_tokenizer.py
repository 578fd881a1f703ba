"""The tokenizers of real pretrained checkpoints, read from a GGUF file or a Hugging Face folder.

A pretrained model only works with the exact ids it was trained on, so this module rebuilds its
tokenizer with the `tokenizers` library (the Rust BPE that Hugging Face uses; no merge loop of our
own) and renders its chat template with jinja2 in the same sandbox transformers uses:

    tok = PretrainedTokenizer.from_gguf(packaged_gguf("smollm2"))   # or .from_hf_dir("ckpt/")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])      # prompt ids, template applied
    tok.check_vocab(model_vocab_size)                               # ids fit the embedding?

or, in a gin config, `make_tokenizer.name = "pretrained"` with `make_tokenizer.gguf_path = ...`.

GGUF files (llama.cpp's format) keep the tokenizer as metadata. Two kinds are read, following
llama.cpp's src/llama-vocab.cpp, the reference implementation for these files:

* `tokenizer.ggml.model == "gpt2"`: byte-level BPE. The vocabulary and merges are stored as is;
  how text is cut into words before merging is not, only named by `tokenizer.ggml.pre`, which
  picks one of llama.cpp's regex lists (PRE_TOKENIZERS below).
* `tokenizer.ggml.model == "llama"`: a SentencePiece vocabulary (pieces with scores, byte
  pieces `<0xNN>`, no merges). It becomes a BPE with byte fallback whose merges are every split
  of a piece into two pieces, best score first, which is how SentencePiece's BPE and llama.cpp's
  SPM tokenizer pick the next merge.

Control tokens (type 3) and user-defined ones (type 4) are matched whole wherever they appear in
the text, as llama.cpp does when it parses specials, so a rendered chat template encodes to its
real turn markers.

Known deviation of transformers' GGUF converter (transformers 5.x,
integrations/gguf/gguf_tokenizer_mapping.py): it has no entry for `pre == "smollm"` and falls
back to the plain GPT-2 split, while llama.cpp, and SmolLM2's own tokenizer.json
(Digits(individual_digits=True) + ByteLevel), first cut every digit out on its own. The
vocabulary has no multi-digit tokens, so this only shows where a run of spaces precedes a digit:
"x =  1" is [..., "Ġ", "Ġ", "1"] through transformers' GGUF loader and [..., "ĠĠ", "1"] here,
as with the original tokenizer. Source code hits this often (indented numbers: 2 of the 20
4 KB standard-library samples the tests compare). We follow llama.cpp and the original.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from train.chat_template import compile_chat_template

GGUF_MODELS = ("gpt2", "llama")
# Texts of the tokens that end a chat turn, best first: the first one a vocabulary has is its
# end_of_turn_id. llama.cpp detects its EOT token from the same list of texts.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<EOT>")
NO_MASK_ID = -1

# GGUF token types (gguf.TokenType), spelled out so the module does not need gguf to load.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's word-splitting regexes (llm_tokenizer_bpe in llama-vocab.cpp). Each regex of a list
# cuts every piece the previous one left, keeping matches and the text between them apart.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp spells (?i:'s|...) out as classes, so that only ASCII letters fold; so do we.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is taken whole (Llama 3)
    add_bos: bool = False        # llama.cpp's default when the file has no add_bos_token


_GPT2 = _PreTokenizer((_GPT2_SPLIT,))
_DIGITS_THEN_GPT2 = _PreTokenizer((r"\p{N}", _GPT2_SPLIT))
_LLAMA3 = _PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizer((_QWEN2_SPLIT,))
# `tokenizer.ggml.pre` value -> how llama.cpp splits words for it (a subset of llama.cpp's list:
# the common model families). "default" is what llama.cpp uses for files without the key.
PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+",
                              r"[0-9][0-9][0-9]")),
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "lfm2"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer((_LLAMA3_SPLIT,))),
    # Qwen2's tokenizer.json also NFC-normalizes; llama.cpp does not, and neither do we.
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), _QWEN2),
}

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> frozenset[str]:
    """The 256 characters byte-level BPE spells bytes with (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + n for n in range(256 - len(printable))]
    return frozenset(map(chr, printable + shifted))


class PretrainedTokenizer:
    """A pretrained model's tokenizer (see module docstring); satisfies the Tokenizer protocol.

    `mask_id` is -1: pretrained causal LMs have no mask token. `pad_id` is the model's padding
    token, else eos; `bos_id` falls back to eos likewise (GPT-2 style vocabularies have one
    <|endoftext|> for both). `add_bos` says whether the model expects BOS before a prompt;
    `encode` never adds it, `encode_prompt` adds it iff add_bos.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, source: str, vocab_size: int,
                 eos_id: int, bos_id: int | None = None, pad_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None,
                 skip_ids: Iterable[int] = (), raw_text_ids: Iterable[int] = (),
                 end_of_turn_id: int | None = None, byte_level: bool = False,
                 template_tokens: dict[str, str] | None = None):
        self._tokenizer = tokenizer
        self.source = source  # the file or folder it was read from, for error messages
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self.bos_id = int(bos_id if bos_id is not None else eos_id)
        self.pad_id = int(pad_id if pad_id is not None else eos_id)
        self.mask_id = NO_MASK_ID
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        # Ids that carry no text: decode drops them and they count 0 bytes.
        self._skip_ids = frozenset(int(i) for i in skip_ids)
        # Added tokens whose vocabulary entry is the literal text, not its byte-level spelling.
        self._raw_text_ids = frozenset(int(i) for i in raw_text_ids)
        self._byte_level = byte_level
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        found = [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
        if end_of_turn_id is None:
            end_of_turn_id = found[0] if found else self.eos_id
        self.end_of_turn_id = int(end_of_turn_id)
        self.stop_ids: tuple[int, ...] = tuple(sorted({self.eos_id, self.end_of_turn_id,
                                                       *found}))
        # What chat templates see as bos_token/eos_token/...: the tokens the source names,
        # like transformers' special_tokens_map (no fallbacks filled in).
        self._template_tokens = dict(template_tokens) if template_tokens is not None else {
            "bos_token": tokenizer.id_to_token(self.bos_id),
            "eos_token": tokenizer.id_to_token(self.eos_id)}

    # ----------------------------------------------------------------------------- loaders

    @classmethod
    def from_gguf(cls, path) -> PretrainedTokenizer:
        """The tokenizer stored in a GGUF file's metadata (tokenizer.ggml.*). `path` is the
        file or a gguf.GGUFReader of it (models.convert_gguf.open_gguf), so that a loader
        parses the file's metadata once for the weights and the tokenizer."""
        import gguf  # only GGUF loading needs it

        if isinstance(path, gguf.GGUFReader):
            reader, path = path, str(path.data.filename)
        else:
            path = str(path)
            if not pathlib.Path(path).is_file():
                raise ValueError(f"GGUF file {path!r} does not exist")
            reader = gguf.GGUFReader(path)
        fields = reader.fields

        def get(key: str, default: Any = None) -> Any:
            return fields[key].contents() if key in fields else default

        kind = get("tokenizer.ggml.model")
        if kind not in GGUF_MODELS:
            raise ValueError(f"GGUF {path!r} has tokenizer.ggml.model {kind!r}; supported: "
                             f"{list(GGUF_MODELS)}")
        tokens: list[str] = get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError(f"GGUF {path!r} has no tokenizer.ggml.tokens")
        types: list[int] = get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if kind == "gpt2":
            tokenizer, default_add_bos = _byte_level_bpe(path, tokens, get)
        else:
            tokenizer, default_add_bos = _sentencepiece_bpe(path, tokens, types, get)
        _add_special_tokens(tokenizer, tokens, types)

        special = {}  # template variable -> id, for the ids the file names
        for name, key in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")]:
            token_id = get(f"tokenizer.ggml.{key}")
            if token_id is not None and not 0 <= token_id < len(tokens):
                raise ValueError(f"GGUF {path!r} has tokenizer.ggml.{key} {token_id}, outside "
                                 f"its vocabulary of {len(tokens)} tokens")
            if token_id is not None:
                special[name] = int(token_id)
        if "eos_token" not in special:
            raise ValueError(f"GGUF {path!r} has no tokenizer.ggml.eos_token_id")
        add_bos = get("tokenizer.ggml.add_bos_token")
        return cls(
            tokenizer, source=path, vocab_size=len(tokens), eos_id=special["eos_token"],
            bos_id=special.get("bos_token"), pad_id=special.get("pad_token"),
            add_bos=default_add_bos if add_bos is None else add_bos,
            chat_template=get("tokenizer.chat_template"),
            skip_ids=[i for i, t in enumerate(types) if t in (_UNKNOWN, _CONTROL, _UNUSED)],
            raw_text_ids=[i for i, t in enumerate(types) if t == _USER_DEFINED],
            end_of_turn_id=get("tokenizer.ggml.eot_token_id"), byte_level=kind == "gpt2",
            template_tokens={name: tokens[i] for name, i in special.items()})

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike) -> PretrainedTokenizer:
        """A Hugging Face tokenizer folder: tokenizer.json plus tokenizer_config.json and
        special_tokens_map.json where present (a chat_template.jinja file wins over the
        config's chat_template, as in transformers)."""
        root = pathlib.Path(directory)
        if not (root / "tokenizer.json").is_file():
            raise ValueError(f"{str(root / 'tokenizer.json')!r} does not exist; from_hf_dir "
                             "needs a folder with a tokenizer.json (a 'fast' HF tokenizer)")
        tokenizer = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        # A tokenizer.json may carry padding/truncation settings; ids here are never cut.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # config wins
            if (root / name).is_file():
                config.update(json.loads((root / name).read_text(encoding="utf-8")))

        def token_text(key: str) -> str | None:
            token = config.get(key)
            return token.get("content") if isinstance(token, dict) else token  # AddedToken

        def token_id(key: str) -> int | None:
            token = token_text(key)
            return None if token is None else tokenizer.token_to_id(token)

        eos_id = token_id("eos_token")
        if eos_id is None:
            raise ValueError(f"{str(root)!r} names no eos_token in its tokenizer_config.json "
                             "or special_tokens_map.json that tokenizer.json knows")
        bos_id = token_id("bos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # No flag: the tokenizer's own post-processor decides, as it does in transformers.
            probe = tokenizer.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and probe[:1] == [bos_id]
        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # named templates: [{"name", "template"}, ...]
            chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
        if (root / "chat_template.jinja").is_file():
            chat_template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        added = tokenizer.get_added_tokens_decoder()
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        template_tokens = {key: token_text(key) for key in
                           ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(
            tokenizer, source=str(root), vocab_size=tokenizer.get_vocab_size(True),
            eos_id=eos_id, bos_id=bos_id, pad_id=token_id("pad_token"), add_bos=add_bos,
            chat_template=chat_template,
            skip_ids=[i for i, t in added.items() if t.special],
            raw_text_ids=[i for i, t in added.items() if not t.special],
            # A ByteLevel decoder, alone or inside a Sequence, means byte-level spellings.
            byte_level='"ByteLevel"' in json.dumps(decoder),
            template_tokens={k: v for k, v in template_tokens.items() if v is not None})

    # ------------------------------------------------------------------ Tokenizer protocol

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()
        kept = [int(i) for i in ids if 0 <= i < self.vocab_size and int(i) not in self._skip_ids]
        if not (self._byte_level and self._raw_text_ids.intersection(kept)):
            return self._tokenizer.decode(kept, skip_special_tokens=True)
        # The ByteLevel decoder would read a user-defined token's literal text as byte-level
        # spelling ("é" is byte 0xE9 there), so those are copied out as is, like llama.cpp does.
        parts, run = [], []
        for i in kept:
            if i in self._raw_text_ids:
                parts += [self._tokenizer.decode(run), self._tokenizer.id_to_token(i)]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self._tokenizer.decode(run)

    def token_byte_lengths(self) -> np.ndarray:
        alphabet = _byte_level_alphabet()
        lengths = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            token = self._tokenizer.id_to_token(i)
            if token is None or i in self._skip_ids:
                continue
            if i in self._raw_text_ids:
                lengths[i] = len(token.encode("utf-8"))
            elif self._byte_level and set(token) <= alphabet:
                lengths[i] = len(token)  # one character per byte
            elif _BYTE_PIECE.fullmatch(token):
                lengths[i] = 1  # SentencePiece byte fallback
            else:
                lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return lengths

    # ------------------------------------------------------------------------- prompts

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt: BOS first iff the model's metadata asks for it (add_bos)."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos else ids

    def apply_chat_template(self, messages: Sequence[dict],
                            add_generation_prompt: bool = True) -> str:
        """The chat rendered by the model's template, exactly as transformers renders it."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.source!r} has no chat template; chat needs an "
                             "instruct model's GGUF (tokenizer.chat_template) or a "
                             "tokenizer_config.json with chat_template")
        template = compile_chat_template(self.chat_template)
        # transformers drops None-valued keys (content=None from OpenAI-style messages).
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt,
                               **self._template_tokens)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True
                    ) -> list[int]:
        """Ids of the rendered chat; the template's own turn markers become their tokens.

        BOS is added only when add_bos says so and the template did not write one already.
        """
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt))
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raises unless every id fits a model with `model_vocab_size` embedding rows (models
        may pad their vocabulary up, so a larger model vocabulary is fine)."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(f"tokenizer {self.source!r} has {self.vocab_size} ids but the "
                             f"model's vocabulary has {model_vocab_size}; they are not a pair")

    def __repr__(self) -> str:
        return f"PretrainedTokenizer({self.source!r})"


# --------------------------------------------------------------------------- GGUF builders


def _byte_level_bpe(path: str, tokens: list[str], get: Callable[..., Any]
                    ) -> tuple[tokenizers.Tokenizer, bool]:
    pre = get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF {path!r} has tokenizer.ggml.pre {pre!r}, which this module does "
                         f"not know; known: {sorted(PRE_TOKENIZERS)}")
    spec = PRE_TOKENIZERS[pre]
    merges = get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError(f"GGUF {path!r} (tokenizer.ggml.model 'gpt2') has no "
                         "tokenizer.ggml.merges")
    # Split at the first space after the first character, as llama.cpp does.
    pairs = [(m[:m.index(" ", 1)], m[m.index(" ", 1) + 1:]) for m in merges]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=spec.ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, spec.add_bos


def _sentencepiece_bpe(path: str, tokens: list[str], types: list[int], get: Callable[..., Any]
                       ) -> tuple[tokenizers.Tokenizer, bool]:
    scores = get("tokenizer.ggml.scores")
    merges = get("tokenizer.ggml.merges")
    if merges:  # newer converters store them; use them as the file says
        pairs = [(m[:m.index(" ", 1)], m[m.index(" ", 1) + 1:]) for m in merges]
    elif scores is None:
        raise ValueError(f"GGUF {path!r} (tokenizer.ggml.model 'llama') has neither "
                         "tokenizer.ggml.scores nor tokenizer.ggml.merges")
    else:
        pairs = _merges_from_scores(tokens, types, scores)
    vocab = {token: i for i, token in enumerate(tokens)}
    unk_id = get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True,
                                                byte_fallback=True))
    # No word splitting: SentencePiece and llama.cpp merge across the whole text (so pieces of
    # several spaces, e.g. indentation, survive). The prefix space goes before every stretch of
    # text, including after a special token, as in llama.cpp.
    escape = normalizers.Replace(" ", "\u2581")
    add_space_prefix = get("tokenizer.ggml.add_space_prefix", True)  # llama.cpp's default
    tokenizer.normalizer = (normalizers.Sequence([normalizers.Prepend("\u2581"), escape])
                            if add_space_prefix else escape)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, True  # llama.cpp adds BOS for SentencePiece vocabularies unless told not


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]
                        ) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a normal piece into two
    normal pieces, ranked by the piece's score (best first).

    SentencePiece merges the adjacent pair whose concatenation scores best; a merge list in that
    order makes `tokenizers`' BPE do the same. Only normal pieces take part: SentencePiece never
    builds control, byte or unused pieces from text. Ties are broken like transformers' GGUF
    converter (longer left part first, then vocabulary order).
    """
    index = {t: i for i, t in enumerate(tokens) if types[i] == _NORMAL}
    found = []
    for piece, i in index.items():
        splits = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))]
        splits = sorted(((l, r) for l, r in splits if l in index and r in index),
                        key=lambda lr: (index[lr[0]], index[lr[1]]))
        found.extend((-scores[i], -len(l), -len(r), l, r) for l, r in splits)
    found.sort(key=lambda m: m[:3])  # stable: equal keys keep vocabulary order
    return [(l, r) for *_, l, r in found]


def _add_special_tokens(tokenizer: tokenizers.Tokenizer, tokens: list[str],
                        types: list[int]) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens,
    so both are matched whole in text (as llama.cpp does) instead of being cut into pieces."""
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)
