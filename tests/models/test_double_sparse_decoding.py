"""Double Sparsity decode attention (arXiv 2408.07092) in the model and the shared loop: the
label cache (written in extend, rewound with the cache), dense equality when every token is
kept, multi-token verification equal to token-by-token decoding, ragged rows, speculative
greedy equal to greedy with a double-sparse target, calibration round trip and its errors."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decoding.generate import generate
from experiments import calibrate_double_sparsity as calibrate_cli
from models import double_sparse_calibration as dsc
from models import registry
from models.core import double_sparse
from models.core.kv_cache import LayerKV
from models.transformer import Transformer, TransformerConfig
from tests import tolerances
from tests.decoding import helpers

# head_dim 16, r = 4 label channels, a quarter of the context once it exceeds 8 keys: prompts
# of up to 13 tokens plus 16 new ones run well into the sparse regime.
DENSE = TransformerConfig(vocab_size=helpers.VOCAB, d_model=32, n_layers=2, n_heads=4,
                          n_kv_heads=2, head_dim=16)
# Every layer double-sparse (ds_dense_layers=0) unless a test says otherwise.
SPARSE = dataclasses.replace(DENSE, decode_attention="double_sparse", ds_label_channels=4,
                             ds_token_sparsity=0.25, ds_min_context=8, ds_dense_layers=0)
# Fixed channels (not calibrated) so the tests do not depend on calibration.
CHANNELS = np.stack([np.stack([np.roll(np.arange(16), 3 * (layer + head))
                               for head in range(2)]) for layer in range(2)]).astype(np.int32)

_extend = nnx.jit(lambda m, tokens, cache: m.extend(tokens, cache))


@pytest.fixture(scope="module")
def dense():
    return registry.construct(Transformer, DENSE, seed=0)


@pytest.fixture(scope="module")
def sparse(dense):
    return dsc.with_double_sparse(dense, CHANNELS, ds_label_channels=4, ds_token_sparsity=0.25,
                                  ds_min_context=8, ds_dense_layers=0)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 24), 0, helpers.VOCAB)


def _run(model, spans, cache=None):
    """Extends a fresh (or given) cache by tokens[:, a:b] for each (a, b) or array in spans;
    returns the logits of every call after the first (the prefill), concatenated, and the cache.
    Every test uses extends of 16, 4 and 1 tokens, so the compilations are shared."""
    cache = model.init_cache(2, 64) if cache is None else cache
    out = []
    for span in spans:
        logits, cache = _extend(model, span, cache)
        out.append(logits)
    return np.concatenate(out[1:], axis=1), cache


def test_label_cache_is_written_for_every_token_and_rewound(sparse, tokens):
    cache = sparse.init_cache(2, 64)
    assert isinstance(cache.layers[0], double_sparse.LabeledKV)
    assert cache.layers[0].label.shape == (2, 64, 2, 4)
    # prefill, a 4-token verification, a decode step
    _, cache = _run(sparse, [tokens[:, :16], tokens[:, 16:20], tokens[:, 20:21]], cache)
    for layer, kv in enumerate(cache.layers):
        want = np.take_along_axis(np.asarray(kv.k[:, :21]),
                                  CHANNELS[layer][None, None, :, :4], axis=-1)
        np.testing.assert_array_equal(np.asarray(kv.label[:, :21]), want)
    # Rewind to 18 and extend other tokens: labels follow the new keys, and the logits equal
    # those of a cache that never saw the rejected tokens.
    other = (tokens[:, 18:22] + 1) % helpers.VOCAB
    logits, rewound = _extend(sparse, other, sparse.rewind(cache, jnp.full((2,), 18)))
    fresh = jnp.concatenate([tokens[:, 16:18], other[:, :2]], axis=1)
    expected, fresh_cache = _run(sparse, [tokens[:, :16], fresh])
    np.testing.assert_allclose(logits[:, :2], expected[:, 2:], rtol=tolerances.F32,
                               atol=tolerances.F32)
    np.testing.assert_array_equal(rewound.layers[1].label[:, :20],
                                  fresh_cache.layers[1].label[:, :20])


SPANS = [(0, 16), (16, 20)]


def test_verification_equals_token_by_token_and_differs_from_dense(sparse, dense, tokens):
    together = _run(sparse, [tokens[:, a:b] for a, b in SPANS])[0]
    one_by_one = _run(sparse, [tokens[:, :16]] + [tokens[:, i:i + 1] for i in range(16, 20)])[0]
    np.testing.assert_allclose(together, one_by_one, rtol=tolerances.F32, atol=tolerances.F32)
    # At 17-20 keys a quarter is 5 tokens: the sparse path is really taken.
    dense_logits = _run(dense, [tokens[:, a:b] for a, b in SPANS])[0]
    assert np.abs(together - dense_logits).max() > 1e-3


def test_keeping_every_token_equals_dense(dense, tokens):
    everything = dsc.with_double_sparse(dense, CHANNELS, ds_token_sparsity=1.0,
                                        ds_min_context=1, ds_label_bits=4, ds_dense_layers=0)
    got, cache = _run(everything, [tokens[:, a:b] for a, b in SPANS])
    want = _run(dense, [tokens[:, a:b] for a, b in SPANS])[0]
    np.testing.assert_allclose(got, want, rtol=tolerances.F32, atol=tolerances.F32)
    # 4-bit labels: int8 storage holding [-7, 7], one scale per (token, kv head).
    label = np.asarray(cache.layers[0].label[:, :20])
    assert label.dtype == np.int8 and np.abs(label).max() == 7
    assert cache.layers[0].label_scale.shape == (2, 64, 2)


def test_dense_first_layers(dense, sparse, tokens):
    """ds_dense_layers=1 (DoubleSparse's evaluation keeps layers 0-1 dense): layer 0 keeps no
    labels and attends densely, so the first block's output equals the dense model's (with
    ds_dense_layers=0 it is double-sparse and differs: see the verification test); layer 1
    still writes labels."""
    first_dense = dsc.with_double_sparse(dense, CHANNELS, ds_label_channels=4,
                                         ds_token_sparsity=0.25, ds_min_context=8,
                                         ds_dense_layers=1)
    assert first_dense.blocks[0].attn.double_sparse is None
    assert sparse.blocks[0].attn.double_sparse is not None
    cache = first_dense.init_cache(2, 64)
    assert type(cache.layers[0]) is LayerKV
    assert isinstance(cache.layers[1], double_sparse.LabeledKV)
    exit1 = nnx.jit(lambda m, t, c: m.extend(t, c, exit_layer=1))
    out = []
    for model in (dense, first_dense):
        c = _extend(model, tokens[:, :16], model.init_cache(2, 64))[1]
        out.append(np.asarray(exit1(model, tokens[:, 16:20], c)[0]))
    assert np.abs(np.asarray(c.layers[1].label[:, :16])).min() > 0
    np.testing.assert_allclose(out[1], out[0], rtol=tolerances.F32, atol=tolerances.F32)



def test_ragged_batch_equals_rows_decoded_alone(sparse):
    batch = generate(sparse, helpers.PROMPTS, sampler="greedy", max_new_tokens=helpers.MAX_NEW)
    for row in (0, 3):  # the shortest and the longest row that ran long enough to sparsify
        prompt = helpers.PROMPTS[row]
        alone = generate(sparse, [prompt], sampler="greedy", max_new_tokens=helpers.MAX_NEW)
        np.testing.assert_array_equal(np.asarray(batch.tokens[row]), np.asarray(alone.tokens[0]))


def test_speculative_greedy_with_double_sparse_target_equals_greedy(sparse, dense):
    plain = generate(sparse, helpers.PROMPTS, sampler="greedy", max_new_tokens=helpers.MAX_NEW)
    spec = generate(sparse, helpers.PROMPTS, sampler="speculative_greedy",
                    draft_model=dense, max_new_tokens=helpers.MAX_NEW)
    for a, b in zip(plain.tokens, spec.tokens):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The dense draft (same weights) agrees often but not always: both accepted drafts
    # (multi-token verification) and rejections (rewinds) happened.
    assert 0 < spec.stats["acceptance_rate"] < 1


def test_per_query_head_selection(sparse, dense, tokens):
    """ds_selection="query_head" (the official code's per-head top-k; the kernel tests check it
    against a numpy loop): a multi-token verification equals the same tokens decoded one by
    one, and the result differs from the per-group selection. (The shared loop only sees the
    model protocol, which the per-group tests above already drive through it.)"""
    per_head = dsc.with_double_sparse(dense, CHANNELS, ds_label_channels=4,
                                      ds_token_sparsity=0.25, ds_min_context=8,
                                      ds_dense_layers=0, ds_selection="query_head")
    assert per_head.blocks[0].attn.double_sparse.select_per == "query_head"
    together = _run(per_head, [tokens[:, a:b] for a, b in SPANS])[0]
    one_by_one = _run(per_head, [tokens[:, :16]] + [tokens[:, i:i + 1] for i in range(16, 20)])[0]
    np.testing.assert_allclose(together, one_by_one, rtol=tolerances.F32, atol=tolerances.F32)
    assert np.abs(together - _run(sparse, [tokens[:, a:b] for a, b in SPANS])[0]).max() > 1e-4


def test_calibration_round_trip_and_errors(dense, tmp_path):
    path = calibrate_cli.run(model=dense, encode=lambda text: [b % 64 for b in text.encode()],
                             num_rows=2, seq_len=32, out=str(tmp_path / "cal.json"))
    ranking = dsc.load_ranking(path, dense.config)
    assert ranking.shape == (2, 2, 16)
    assert all(sorted(row) == list(range(16)) for row in ranking.reshape(-1, 16))
    model = dsc.with_double_sparse(dense, path, ds_label_channels=4, ds_dense_layers=1)
    assert model.blocks[1].attn.ds_channels == tuple(map(tuple, ranking[1, :, :4]))
    # A workdir finds its file by name.
    dsc.save_calibration(dsc.calibration_path(tmp_path), dense, ranking)
    np.testing.assert_array_equal(dsc.load_ranking(tmp_path, dense.config), ranking)
    # Another architecture: one line naming both hashes and the field that differs.
    with pytest.raises(ValueError, match=r"is for another model .*d_model=32 \(file\) vs 48"):
        dsc.load_ranking(path, dataclasses.replace(DENSE, d_model=48))
    with pytest.raises(ValueError, match="no Double Sparsity calibration at .*calibrate_double"):
        dsc.load_ranking(tmp_path / "missing.json", dense.config)
    payload = json.loads(open(path).read())
    payload["format_version"] = 0
    open(path, "w").write(json.dumps(payload))
    with pytest.raises(ValueError, match="format_version 0"):
        dsc.load_ranking(path, dense.config)


def test_decoding_without_calibration_says_what_to_run(sparse):
    graphdef, state = nnx.split(sparse)
    uncalibrated = nnx.merge(graphdef, state)
    for block in uncalibrated.blocks:
        block.attn.ds_channels = None
    with pytest.raises(ValueError, match="no calibrated label channels; run `python -m "
                                         "experiments.calibrate_double_sparsity"):
        jax.eval_shape(lambda: uncalibrated.extend(jnp.zeros((1, 2), jnp.int32),
                                                   uncalibrated.init_cache(1, 16)))


@pytest.mark.parametrize("overrides,match", [
    (dict(ds_label_channels=17), r"ds_label_channels=17 must be in \[1, head_dim=16\]"),
    (dict(ds_token_sparsity=1.5), r"ds_token_sparsity=1.5 must be in \(0, 1\]"),
    (dict(decode_attention="sparse"), r"unknown decode_attention 'sparse'; valid"),
    (dict(window=4), r"needs full attention; got window=4"),
    (dict(ds_label_bits=2), r"ds_label_bits=2; valid: \(4, 8, 16\)"),
    (dict(ds_dense_layers=2), r"ds_dense_layers=2 must be in \[0, n_layers=2\)"),
    (dict(ds_selection="token"), r"ds_selection='token'; valid: \('kv_group', 'query_head'\)"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(SPARSE, **overrides)


def test_channels_of_the_wrong_shape_are_refused(dense):
    with pytest.raises(ValueError, match="got channels for 3 layers; the model has 2"):
        dsc.with_double_sparse(dense, np.zeros((3, 2, 16), np.int32), ds_dense_layers=0)
    with pytest.raises(ValueError, match="do not give r=4 channels"):
        dsc.with_double_sparse(dense, np.zeros((2, 2, 3), np.int32), ds_label_channels=4,
                               ds_dense_layers=0)


def test_generate_cli_flag_attaches_the_calibration_or_names_it_missing(dense, tmp_path):
    """experiments.generate --decode_attention=double_sparse [--ds_calibration=FILE]: the
    target is made double-sparse with the workdir's calibration; without one, one line says
    what to run (checked through decode_text, before anything compiles)."""
    from experiments import calibrate_double_sparsity as calib
    from experiments import generate as cli

    byte_model = registry.construct(Transformer, dataclasses.replace(DENSE, vocab_size=260))
    restore = lambda workdir, step=None: (byte_model, "transformer", None)  # noqa: E731
    with pytest.raises(ValueError, match=r"no Double Sparsity calibration at .*"
                                         r"double_sparse_channels\.json.*calibrate_double"):
        cli.decode_text(str(tmp_path), "ab", restore=restore, decode_attention="double_sparse",
                        ds_dense_layers=1)
    with pytest.raises(ValueError, match=r"\['ds_token_sparsity'\] apply only with "
                                         r"decode_attention='double_sparse'"):
        cli.decode_text(str(tmp_path), "ab", restore=restore, ds_token_sparsity=0.5)
    with pytest.raises(ValueError, match=r"needs --ds_calibration=FILE"):
        calib.decoding_model(dense, "double_sparse")  # a --gguf/--hf_dir model
    with pytest.raises(ValueError, match="unknown decode_attention 'sparse'"):
        calib.decoding_model(dense, "sparse")
    ranking = np.stack([np.stack([np.roll(np.arange(16), h + 5 * layer) for h in range(2)])
                        for layer in range(2)]).astype(np.int32)
    dsc.save_calibration(dsc.calibration_path(tmp_path), dense, ranking)
    with pytest.raises(ValueError, match=r"ds_dense_layers=2 must be in \[0, n_layers=2\)"):
        calib.decoding_model(dense, "double_sparse", workdir=str(tmp_path))  # the default
    model = calib.decoding_model(dense, "double_sparse", workdir=str(tmp_path),
                                 token_sparsity=0.5, dense_layers=1)
    assert model.config.ds_token_sparsity == 0.5 and model.config.ds_dense_layers == 1
    # r defaults to head_dim // 16 = 1: the workdir file's best channel per kv head.
    assert model.blocks[1].attn.ds_channels == tuple(map(tuple, ranking[1, :, :1]))
    assert calib.decoding_model(dense, "dense") is dense
    # The README's setting through the same flags: per query head, r = 4 of 16, 4-bit labels.
    readme = calib.decoding_model(dense, "double_sparse", workdir=str(tmp_path), dense_layers=1,
                                  selection="query_head", label_channels=4, label_bits=4)
    assert (readme.config.ds_selection, readme.config.ds_label_bits) == ("query_head", 4)
    assert readme.blocks[1].attn.ds_channels == tuple(map(tuple, ranking[1, :, :4]))
    with pytest.raises(ValueError, match=r"\['ds_selection'\] apply only with"):
        calib.decoding_model(dense, "dense", selection="query_head")
