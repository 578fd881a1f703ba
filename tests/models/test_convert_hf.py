"""swiftlm's Transformer and Hugging Face's LlamaForCausalLM are the same model (Llama, arXiv
2302.13971): converted weights give the same f32 logits and the same greedy continuation, in
both directions, and bad checkpoints are refused with errors that name what is wrong."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from models import convert_hf
from models.transformer import Transformer, TransformerConfig
from tests import tolerances

# GQA (4 query heads over 2 kv heads), a head_dim and mlp_dim off their defaults (so that a
# wrong reshape of q/o or a swapped gate/up cannot cancel out), non-default theta and eps.
CONFIG = TransformerConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           head_dim=24, mlp_dim=96, rope_theta=5000.0, norm_eps=1e-5)
TIED = TransformerConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         tie_embeddings=True)
PROMPT_LEN, NEW_TOKENS = 7, 8

_forward = nnx.jit(lambda m, tokens: m(tokens).logits)


@nnx.jit(static_argnames="steps")
def _greedy(model: Transformer, prompt: jax.Array, steps: int) -> jax.Array:
    """Greedy continuation [B, steps] through the KV cache: prefill, then one token a step."""
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + steps)
    logits, cache = model.extend(prompt, cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.zeros((prompt.shape[0], steps), jnp.int32).at[:, 0].set(first)

    def step(i, carry):
        out, cache = carry
        logits, cache = model.extend(jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1), cache)
        return out.at[:, i].set(jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)), cache

    out, _ = jax.lax.fori_loop(1, steps, step, (out, cache))
    return out


def _tokens(config, batch=2, length=PROMPT_LEN, seed=1) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(seed), (batch, length), 0,
                                         config.vocab_size), np.int64)


def _our_model(config: TransformerConfig, seed: int = 0) -> Transformer:
    """A Transformer with random weights, its norm scales random too: at their init value of 1,
    swapping the two norms of a block (or dropping one) would go unnoticed.

    The module is built abstractly and filled from numpy, because compiling the random
    initialiser costs several CPU seconds per config while this costs milliseconds.
    """
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    for path, variable in flat:
        shape = variable.get_value().shape
        value = (rng.uniform(0.5, 1.5, shape) if path[-1] == "scale"
                 else 0.02 * rng.standard_normal(shape))
        variable.set_value(jnp.asarray(value, jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _hf_model(hf_config: dict, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**hf_config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, norm
                p.uniform_(0.5, 1.5)
    return model


def _hf_logits(hf: LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return hf(torch.from_numpy(tokens)).logits.numpy()


def _hf_greedy(hf: LlamaForCausalLM, prompt: np.ndarray, steps: int) -> np.ndarray:
    # No EOS, so HF decodes exactly `steps` tokens (as our loop does); pad id only silences a
    # warning, there is no padding.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.inference_mode():
        out = hf.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(
            torch.from_numpy(prompt)), max_new_tokens=steps, do_sample=False, use_cache=True)
    assert out.shape == (prompt.shape[0], prompt.shape[1] + steps)
    return out[:, prompt.shape[1]:].numpy()


def _assert_same_model(ours: Transformer, hf: LlamaForCausalLM, config: TransformerConfig):
    tokens = _tokens(config, length=12, seed=2)
    np.testing.assert_allclose(np.asarray(_forward(ours, jnp.asarray(tokens, jnp.int32))),
                               _hf_logits(hf, tokens), atol=tolerances.CROSS_FRAMEWORK_F32,
                               rtol=tolerances.CROSS_FRAMEWORK_F32)
    prompt = _tokens(config, seed=3)
    np.testing.assert_array_equal(
        np.asarray(_greedy(ours, jnp.asarray(prompt, jnp.int32), NEW_TOKENS)),
        _hf_greedy(hf, prompt, NEW_TOKENS))


def test_export_state_dict_loads_strictly_into_hf_and_matches():
    ours = _our_model(CONFIG)
    hf = LlamaForCausalLM(LlamaConfig(**convert_hf.config_to_hf(CONFIG))).eval()
    state = {k: torch.from_numpy(v) for k, v in convert_hf.to_hf_state_dict(ours).items()}
    hf.load_state_dict(state, strict=True)
    _assert_same_model(ours, hf, CONFIG)


def test_tied_model_saved_to_files_loads_with_from_pretrained_and_matches(tmp_path):
    ours = _our_model(TIED, seed=4)
    convert_hf.save_hf(ours, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # tied on the HF side too
    _assert_same_model(ours, hf, TIED)


def test_hf_checkpoint_loads_into_ours_and_matches(tmp_path):
    hf = _hf_model(convert_hf.config_to_hf(CONFIG), seed=5)
    hf.save_pretrained(tmp_path)
    ours = convert_hf.load_hf(tmp_path)
    assert ours.config == CONFIG
    _assert_same_model(ours, hf, CONFIG)


def test_tied_hf_checkpoint_loads_into_ours(tmp_path):
    """HF writes a tied head once (no lm_head.weight in the file); our side must tie it."""
    hf = _hf_model(convert_hf.config_to_hf(TIED), seed=6)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in safetensors.numpy.load_file(tmp_path / "model.safetensors")
    ours = convert_hf.load_hf(tmp_path)
    assert ours.config == TIED and not hasattr(ours, "lm_head")
    tokens = _tokens(ours.config, length=12, seed=7)  # the shape compiled for TIED already
    np.testing.assert_allclose(np.asarray(_forward(ours, jnp.asarray(tokens, jnp.int32))),
                               _hf_logits(hf, tokens), atol=tolerances.CROSS_FRAMEWORK_F32,
                               rtol=tolerances.CROSS_FRAMEWORK_F32)


def test_bfloat16_checkpoint_loads_exactly_as_f32(tmp_path):
    """Released checkpoints are usually bf16, which numpy cannot hold natively."""
    hf = _hf_model(convert_hf.config_to_hf(CONFIG), seed=8).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = convert_hf.load_hf(tmp_path)
    expected = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    actual = convert_hf.to_hf_state_dict(ours)
    assert set(actual) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


@pytest.mark.parametrize("config", [CONFIG, TIED, TransformerConfig()])
def test_config_round_trips_through_hf(config):
    hf = convert_hf.config_to_hf(config)
    assert convert_hf.config_from_hf(hf) == config
    # ... also after transformers has parsed it and written its own config dict.
    assert convert_hf.config_from_hf(LlamaConfig(**hf).to_dict()) == config


def _hf_state_dict(config: TransformerConfig) -> dict[str, np.ndarray]:
    hf = LlamaForCausalLM(LlamaConfig(**convert_hf.config_to_hf(config)))
    return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


@pytest.fixture
def state_dict() -> dict[str, np.ndarray]:
    return _hf_state_dict(CONFIG)


def test_missing_key_is_named(state_dict):
    del state_dict["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_hf.from_hf_state_dict(state_dict, CONFIG)


def test_wrong_shape_is_named(state_dict):
    bad = state_dict
    bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(64, 64\).*\(48, 64\)"):
        convert_hf.from_hf_state_dict(bad, CONFIG)


def test_unexpected_key_is_named(state_dict):
    bad = {**state_dict, "model.layers.2.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}
    with pytest.raises(ValueError, match=r"no place.*model\.layers\.2\.mlp\.up_proj"):
        convert_hf.from_hf_state_dict(bad, CONFIG)


def test_untied_head_refused_for_tied_config():
    sd = _hf_state_dict(TIED)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        convert_hf.from_hf_state_dict(sd, TIED)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_incompatible_hf_config_is_refused(change, message):
    hf = {**convert_hf.config_to_hf(CONFIG), **change}
    with pytest.raises(ValueError, match=message):
        convert_hf.config_from_hf(hf)


def test_windowed_model_is_not_exported():
    with pytest.raises(ValueError, match="window=4"):
        convert_hf.config_to_hf(TransformerConfig(window=4))


def test_load_hf_names_missing_files(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        convert_hf.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(convert_hf.config_to_hf(CONFIG)))
    with pytest.raises(ValueError, match="model.safetensors"):
        convert_hf.load_hf(tmp_path)
