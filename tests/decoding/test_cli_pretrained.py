"""experiments/generate.py on real-checkpoint files: a GGUF model with its own vocabulary and
chat template decodes through the shared loop (plain, streamed, chat-formatted, with a GGUF
draft, in bf16), and bad requests fail with errors that name the problem. The GGUF here is a
tiny model written by models/convert_gguf.save_gguf, so the tests stay fast; the packaged
SmolLM2 is covered by tests/models/test_convert_gguf.py."""
import pytest

pytest.importorskip("gguf")

from experiments import generate as cli  # noqa: E402
from models import convert_gguf  # noqa: E402
from models.convert_gguf import GGUFVocab  # noqa: E402
from tests.decoding import helpers  # noqa: E402
from train import gguf_vocab  # noqa: E402
from train.tokenizer import ByteTokenizer  # noqa: E402

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def _write(path, *, chat_template=None):
    model = helpers.model(vocab=260)
    vocab = gguf_vocab.gguf_vocab(ByteTokenizer(), 260)
    convert_gguf.save_gguf(model, path, vocab=GGUFVocab(**{**vocab.__dict__,
                                                          "chat_template": chat_template}))
    return model


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "chat.gguf")
    model = _write(path, chat_template=TEMPLATE)
    return path, model


def test_gguf_model_decodes_and_streams_like_its_checkpoint(chat_file):
    path, model = chat_file
    deltas = []
    text, stats = cli.decode_text(None, "ab", gguf=path, max_new_tokens=9,
                                  on_text=deltas.append, chunk_steps=2)
    restore = lambda workdir, step=None: (model, "transformer", model.config)  # noqa: E731
    _, same = cli.decode_text("somewhere", "ab", max_new_tokens=9, restore=restore)
    # The GGUF round trip kept the model and the tokenizer's ids.
    assert stats["tokens"] == same["tokens"] and len(stats["tokens"]) == 9
    assert deltas  # printed as it was produced (of random bytes; see the next test)
    assert stats["format"] == "gguf" and stats["prompt_tokens"] == 3  # BOS, 'a', 'b'


def test_streamed_text_holds_back_a_character_cut_between_chunks():
    ids = list("naïve ✓ done".encode())
    deltas = []
    stream = cli._TextStream(ByteTokenizer(), deltas.append)
    for cut in (3, 4, 8, 9, len(ids)):  # 3 and 8 end inside 'ï' and '✓'
        stream([ids[:cut]])
    assert deltas[0] == "na" and "".join(deltas) == "naïve ✓ done"


def test_chat_template_wraps_the_prompt(chat_file):
    path, _ = chat_file
    _, stats = cli.decode_text(None, "hi", gguf=path, chat=True, system="be brief",
                               max_new_tokens=3)
    rendered = "[system] be brief\n[user] hi\n[assistant] "
    assert stats["prompt_tokens"] == 1 + len(rendered.encode())  # add_bos, then the bytes
    assert stats["chat"] is True


def test_speculative_with_a_gguf_draft_and_bf16(chat_file):
    path, _ = chat_file
    plain, _ = cli.decode_text(None, "ab", gguf=path, max_new_tokens=8)
    text, stats = cli.decode_text(None, "ab", gguf=path, draft_gguf=path,
                                  sampler="speculative_greedy", max_new_tokens=8)
    assert text == plain and stats["acceptance_rate"] == 1.0  # the draft is the target
    _, stats = cli.decode_text(None, "ab", gguf=path, dtype="bfloat16", max_new_tokens=4)
    assert stats["dtype"] == "bfloat16" and stats["new_tokens"] == [4]


def test_bad_requests_name_the_problem(tmp_path, chat_file):
    path, model = chat_file
    bare = str(tmp_path / "bare.gguf")
    _write(bare)
    with pytest.raises(ValueError, match="has no chat template"):
        cli.decode_text(None, "hi", gguf=bare, chat=True)
    restore = lambda workdir, step=None: (model, "transformer", model.config)  # noqa: E731
    with pytest.raises(ValueError, match="--chat needs a model with a chat template"):
        cli.decode_text("somewhere", "hi", chat=True, restore=restore)
    with pytest.raises(ValueError, match="exactly one of workdir, model, gguf or hf_dir"):
        cli.decode_text("somewhere", "hi", gguf=path)
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        cli.decode_text(None, "hi", gguf=path, dtype="float16")
    with pytest.raises(ValueError, match="unknown packaged model 'llama9'"):
        cli.decode_text(None, "hi", model_name="llama9")
    with pytest.raises(ValueError, match="system='x' applies only with --chat"):
        cli.decode_text(None, "hi", gguf=path, system="x")


def test_hf_directory_decodes_like_the_gguf_file(tmp_path, chat_file):
    import json

    from models import convert_hf
    from train.pretrained_tokenizer import PretrainedTokenizer

    path, model = chat_file
    convert_hf.save_hf(model, tmp_path)
    PretrainedTokenizer.from_gguf(path)._tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "add_bos_token": True, "chat_template": TEMPLATE}))
    _, from_gguf = cli.decode_text(None, "hi", gguf=path, chat=True, max_new_tokens=6)
    _, from_hf = cli.decode_text(None, "hi", hf_dir=str(tmp_path), chat=True, max_new_tokens=6)
    assert from_hf["tokens"] == from_gguf["tokens"]
    assert from_hf["prompt_tokens"] == from_gguf["prompt_tokens"]
    assert from_hf["format"] == "hf"


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, chat_file):
    from models import convert_hf
    from models.packaged import packaged_gguf
    from train.pretrained_tokenizer import PretrainedTokenizer

    _, model = chat_file  # 260 ids
    convert_hf.save_hf(model, tmp_path)
    smollm2 = PretrainedTokenizer.from_gguf(packaged_gguf("smollm2"))  # 49152 ids
    smollm2._tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    with pytest.raises(ValueError, match="has 49152 ids but the model's vocabulary has 260"):
        cli.decode_text(None, "hi", hf_dir=str(tmp_path))
