"""Tests for train/pretrained_tokenizer.py: GGUF and Hugging Face tokenizers of real checkpoints.

The reference is transformers (ids and chat strings) on the packaged SmolLM2-135M-Instruct GGUF,
and SentencePiece itself for the SentencePiece ("llama") kind. The GGUF and the HF tokenizer are
each loaded once per module: reading the 98 MB file takes seconds.
"""
import json
import os
import pickle

import jinja2
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import tokenizers  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

from models.packaged import packaged_gguf  # noqa: E402
from train import corpus  # noqa: E402
from train.pretrained_tokenizer import PRE_TOKENIZERS, PretrainedTokenizer  # noqa: E402
from train.tokenizer import (SentencePieceTokenizer, Tokenizer, make_tokenizer,  # noqa: E402
                             train_sentencepiece)

CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "You answer in one line."},
     {"role": "user", "content": "Name a prime  above 100."},
     {"role": "assistant", "content": "101 — it has no divisors but 1 and itself."},
     {"role": "user", "content": "héllo ✓ 漢字 🐍\n    indented 7"}],
]
UNICODE_TEXT = "héllo wörld ✓ 漢字 🐍\n\tx = [1, 22,  333]\n"


@pytest.fixture(scope="module")
def smollm_path() -> str:
    return packaged_gguf("smollm2")


@pytest.fixture(scope="module")
def tok(smollm_path) -> PretrainedTokenizer:
    return PretrainedTokenizer.from_gguf(smollm_path)


@pytest.fixture(scope="module")
def hf(smollm_path):
    """(transformers' tokenizer of the GGUF with SmolLM2's original pre-tokenizer, the
    unpatched backend transformers builds from the GGUF)."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(smollm_path),
                                           gguf_file=os.path.basename(smollm_path))
    stock = tokenizers.Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    # transformers' GGUF converter has no entry for tokenizer.ggml.pre == "smollm" and splits
    # words with the plain GPT-2 regex, while llama.cpp and SmolLM2's own tokenizer.json cut
    # digits out first (see the module docstring). Reference ids come from the original
    # pre-tokenizer, copied from SmolLM2's tokenizer.json.
    hf_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return hf_tok, stock


@pytest.fixture(scope="module")
def corpus_sample() -> list[str]:
    """The first 4 KB of 20 stdlib files spread over the sorted listing."""
    files = corpus.list_stdlib_files()
    picked = files[::len(files) // 20][:20]
    return [corpus.read_source(corpus.stdlib_root() / f)[:4096] for f in picked]


def _hf_ids(hf_tok, text: str) -> list[int]:
    return hf_tok.encode(text, add_special_tokens=False)


def test_smollm2_specials_and_protocol(tok):
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (
        49152, 1, 2, 2, -1)
    # <|im_end|> (2) ends a turn; <|endoftext|> (0) ends generation as well.
    assert tok.end_of_turn_id == 2 and tok.stop_ids == (0, 2)
    assert tok.add_bos is False and tok.encode_prompt("Hi") == tok.encode("Hi") == [26843]
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    tok.check_vocab(49152)
    tok.check_vocab(49408)  # a model may pad its embedding up
    assert repr(tok) == f"PretrainedTokenizer({tok.source!r})"


def test_ids_match_transformers_on_the_corpus(tok, hf, corpus_sample):
    hf_tok, _ = hf
    for text in corpus_sample:
        assert tok.encode(text) == _hf_ids(hf_tok, text)


def test_transformers_gguf_converter_deviates_before_digits(tok, hf):
    """Documents the deviation (module docstring): drop the `stock` assertion once
    transformers' GGUF converter learns tokenizer.ggml.pre == "smollm"."""
    hf_tok, stock = hf
    text = "x =  1\n    12"
    ours = tok.encode(text)
    assert ours == _hf_ids(hf_tok, text) == [104, 446, 256, 33, 2367, 33, 34]  # "ĠĠ", "1"
    assert stock.encode(text).ids == [104, 446, 216, 216, 33, 472, 216, 33, 34]  # "Ġ", "Ġ", "1"
    # Without a space run before a digit all three agree.
    for text in ["Hello world! 123", "  multiple   spaces", "a 1 b22"]:
        assert tok.encode(text) == stock.encode(text).ids == _hf_ids(hf_tok, text)


def test_roundtrip_specials_byte_lengths_and_pickle(tok, corpus_sample):
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (49152,) and lengths.dtype == np.int32
    assert lengths[:17].sum() == 0  # the 17 control tokens carry no text
    for text in [*corpus_sample, UNICODE_TEXT]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, 0]) == text
        assert tok.decode(np.asarray(ids)) == text
        assert lengths[ids].sum() == len(text.encode("utf-8"))
    # Turn markers in text are matched whole, as llama.cpp and transformers do.
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.decode([1, 4093, 198, 6004, 2]) == "user\nhi"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    assert clone.stop_ids == tok.stop_ids and clone.chat_template == tok.chat_template


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS, ids=["user", "system_user_assistant_user"])
def test_chat_template_matches_transformers(tok, hf, chat, add_generation_prompt):
    hf_tok, _ = hf
    rendered = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert rendered == hf_tok.apply_chat_template(
        chat, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = tok.encode_chat(chat, add_generation_prompt=add_generation_prompt)
    assert ids == list(hf_tok.apply_chat_template(
        chat, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False))
    assert ids[0] == 1  # <|im_start|>, written by the template; no BOS added (add_bos False)
    if add_generation_prompt:
        assert ids[-4:] == [1, *tok.encode("assistant\n")]  # "<|im_start|>assistant\n"
    else:
        assert ids[-2:] == [tok.end_of_turn_id, 198]  # "<|im_end|>", "\n"


def test_from_hf_dir_matches_gguf(tok, hf, tmp_path, corpus_sample):
    hf_tok, _ = hf
    hf_tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "bos_token": "<|im_start|>",
        "pad_token": "<|im_end|>", "add_bos_token": False}))
    # eos from special_tokens_map.json, in the serialized-AddedToken form.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>", "special": True}}))
    loaded = PretrainedTokenizer.from_hf_dir(tmp_path)
    assert isinstance(loaded, Tokenizer)
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.add_bos,
            loaded.end_of_turn_id, loaded.stop_ids) == (
        tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.end_of_turn_id,
        tok.stop_ids)
    for text in [*corpus_sample[:5], UNICODE_TEXT]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert loaded.apply_chat_template(CHATS[1]) == tok.apply_chat_template(CHATS[1])
    assert loaded.encode_chat(CHATS[1]) == tok.encode_chat(CHATS[1])
    assert np.array_equal(loaded.token_byte_lengths(), tok.token_byte_lengths())
    # Without an add_bos_token flag the post-processor decides (this one adds nothing).
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert PretrainedTokenizer.from_hf_dir(tmp_path).add_bos is False


# ------------------------------------------------------------ SentencePiece ("llama") GGUF

GGUF_TYPES = {"normal": 1, "unknown": 2, "control": 3, "byte": 6}


def _write_gguf(path, model: str, tokens: list[str], *, types=None, scores=None, merges=None,
                pre=None, bos=None, eos=None, pad=None, unk=None, add_space_prefix=None,
                chat_template=None) -> str:
    """A GGUF holding only tokenizer metadata, as llama.cpp's converters write it."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types if types is not None else [1] * len(tokens))
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    for add, value in [(writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos),
                       (writer.add_pad_token_id, pad), (writer.add_unk_token_id, unk),
                       (writer.add_add_space_prefix, add_space_prefix),
                       (writer.add_chat_template, chat_template)]:
        if value is not None:
            add(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def spm_pair(tmp_path_factory) -> tuple[SentencePieceTokenizer, str]:
    """A tiny SentencePiece BPE model and a GGUF holding its vocabulary (no chat template)."""
    root = tmp_path_factory.mktemp("spm")
    texts = [(corpus.stdlib_root() / name).read_text(encoding="utf-8")
             for name in ("textwrap.py", "json/decoder.py", "string.py")]
    sp = SentencePieceTokenizer(train_sentencepiece(texts, root / "tiny", vocab_size=600,
                                                    num_threads=1))
    proc = sp._sp

    def kind(i: int) -> int:
        for name, test in [("unknown", proc.is_unknown), ("control", proc.is_control),
                           ("byte", proc.is_byte)]:
            if test(i):
                return GGUF_TYPES[name]
        return GGUF_TYPES["normal"]

    n = sp.vocab_size
    path = _write_gguf(root / "tiny.gguf", "llama", [proc.id_to_piece(i) for i in range(n)],
                       types=[kind(i) for i in range(n)],
                       scores=[proc.get_score(i) for i in range(n)], bos=sp.bos_id,
                       eos=sp.eos_id, pad=sp.pad_id, unk=proc.unk_id(), add_space_prefix=False)
    return sp, path


def test_sentencepiece_gguf_matches_sentencepiece(spm_pair):
    sp, path = spm_pair
    tok = PretrainedTokenizer.from_gguf(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (600, 2, 3, 0)
    assert tok.stop_ids == (3,) and tok.end_of_turn_id == 3
    # No add_bos_token in the file: llama.cpp's default for SentencePiece vocabularies is BOS.
    assert tok.add_bos is True and tok.encode_prompt("x") == [2, *tok.encode("x")]
    held_out = [corpus.read_source(corpus.stdlib_root() / name)
                for name in ("shlex.py", "base64.py", "fnmatch.py", "colorsys.py", "bisect.py")]
    for text in [*held_out, UNICODE_TEXT]:
        # Control pieces written as text ("<s>", "<mask>") are matched whole here (llama.cpp
        # parses specials) but are plain text to SentencePiece; the texts hold none.
        assert not any(p in text for p in ("<s>", "</s>", "<pad>", "<unk>", "<mask>"))
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text
    assert np.array_equal(tok.token_byte_lengths(), sp.token_byte_lengths())


# ------------------------------------------------------------------------- byte-level kinds

def _byte_level_gguf(path, pre: str) -> str:
    """Bytes (spelled byte-level), three merges, a control token (eos) and two user-defined
    tokens, which llama.cpp's converter stores as literal text."""
    from train.pretrained_tokenizer import _byte_level_alphabet

    alphabet = sorted(_byte_level_alphabet())
    tokens = [*alphabet, "12", "34", "1234", "<|endoftext|>", "<think>", "é!"]
    return _write_gguf(path, "gpt2", tokens, types=[1] * (len(alphabet) + 3) + [3, 4, 4],
                       merges=["1 2", "3 4", "12 34"], pre=pre, eos=len(alphabet) + 3)


@pytest.mark.parametrize("pre, pieces", [
    ("gpt2", ["1234"]),             # " ?\p{N}+": the whole number is one word
    ("smollm", list("1234")),       # every digit on its own first
    ("qwen2", list("1234")),        # "\p{N}": single digits
    ("llama-bpe", ["12", "3", "4"]),  # "\p{N}{1,3}": "123" + "4"
    ("default", ["12", "3", "4"]),  # llama.cpp's default list ends with [0-9]{3}
])
def test_pre_tokenizer_follows_llama_cpp(tmp_path, pre, pieces):
    tok = PretrainedTokenizer.from_gguf(_byte_level_gguf(tmp_path / "bl.gguf", pre))
    ids = tok.encode("1234")
    assert [tok._tokenizer.id_to_token(i) for i in ids] == pieces
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT
    assert tok.bos_id == tok.eos_id == tok.pad_id == 259  # no bos/pad in the file: eos
    # Control and user-defined tokens are matched whole; user-defined ones decode as their
    # literal text ("é" is not byte 0xE9 there) and count its UTF-8 bytes.
    text = "a<|endoftext|>b<think>é!"
    assert tok.encode(text) == [ord("a") - ord("!"), 259, ord("b") - ord("!"), 260, 261]
    assert tok.decode(tok.encode(text)) == "ab<think>é!"
    assert tok.token_byte_lengths()[[0, 256, 259, 260, 261]].tolist() == [1, 2, 0, 7, 3]
    assert tok.add_bos is (pre == "llama-bpe")  # llama.cpp's default for Llama 3 files


FANCY_TEMPLATE = """{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}
{{ raise_exception('no tools: ' + m['content']) }}{% endif %}
{% if loop.index > 4 %}{% break %}{% endif %}
<{{ m['role'] }}>{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}\
{% endgeneration %}{% else %}{{ m['content'] | tojson }}{% endif %}{{ eos_token }}
{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_chat_template_features_render_like_transformers(spm_pair):
    """Filters, globals, extensions and whitespace control beyond SmolLM2's simple template."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = PretrainedTokenizer.from_gguf(spm_pair[1])
    tok.chat_template = FANCY_TEMPLATE
    chat = [*CHATS[1], {"role": "user", "content": "dropped by {% break %}"}]
    for add_generation_prompt in (True, False):
        (expected,), _ = render_jinja_template(
            [chat], chat_template=FANCY_TEMPLATE, add_generation_prompt=add_generation_prompt,
            bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
        assert tok.apply_chat_template(chat, add_generation_prompt) == expected
    assert "dropped" not in expected  # {% break %} after the 4th message
    # transformers' tojson keeps non-ASCII characters (jinja's own would \\u-escape them).
    assert '<user>"héllo ✓ 漢字 🐍\\n    indented 7"</s>\n' in expected
    with pytest.raises(jinja2.TemplateError, match="no tools: ls"):
        tok.apply_chat_template([{"role": "tool", "content": "ls"}])


# ----------------------------------------------------------------------------------- errors

def test_errors_name_the_bad_value(tmp_path, spm_pair, tok):
    _, spm_gguf = spm_pair
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model 'bert'.*\['gpt2', 'llama'\]"):
        PretrainedTokenizer.from_gguf(_write_gguf(tmp_path / "bert.gguf", "bert", ["a"], eos=0))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre 'nonesuch'.*'smollm'"):
        PretrainedTokenizer.from_gguf(_byte_level_gguf(tmp_path / "pre.gguf", "nonesuch"))
    with pytest.raises(ValueError, match=r"tiny.gguf'? has no chat template"):
        PretrainedTokenizer.from_gguf(spm_gguf).apply_chat_template(CHATS[0])
    with pytest.raises(ValueError, match=r"has 49152 ids but the model's vocabulary has 32000"):
        tok.check_vocab(32000)
    with pytest.raises(ValueError, match=r"tokenizer\.json'? does not exist"):
        PretrainedTokenizer.from_hf_dir(tmp_path)
    with pytest.raises(ValueError, match=r"missing\.gguf'? does not exist"):
        PretrainedTokenizer.from_gguf(tmp_path / "missing.gguf")
    assert sorted(PRE_TOKENIZERS)  # the list the pre error names is not empty


def test_make_tokenizer_pretrained(spm_pair):
    _, spm_gguf = spm_pair
    made = make_tokenizer("pretrained", gguf_path=spm_gguf)
    assert isinstance(made, PretrainedTokenizer) and made.vocab_size == 600
    with pytest.raises(ValueError, match=r"exactly one of gguf_path.*hf_dir"):
        make_tokenizer("pretrained")
    with pytest.raises(ValueError, match=r"exactly one of gguf_path.*hf_dir"):
        make_tokenizer("pretrained", gguf_path=spm_gguf, hf_dir="x")
    with pytest.raises(ValueError, match=r"'wordpiece'.*'pretrained'"):
        make_tokenizer("wordpiece")
