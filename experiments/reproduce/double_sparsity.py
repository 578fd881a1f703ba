"""Reproduction of Double Sparsity (Yang et al. 2024, arXiv 2408.07092) on SmolLM2-135M.

    python -m experiments.reproduce.double_sparsity [--parts perplexity,retrieval,...]
        [--fractions 1,4,8,16] [--ablation oracle,...] [--bench_jsonl FILE]
        [--out docs/results/double_sparsity.md]

Quality of double-sparse decode attention on a real pretrained model (SmolLM2-135M-Instruct,
f32, 30 layers, 9 query / 3 KV heads of 64 channels), with r = D/16 = 4 label channels
calibrated on the corpus' train split (experiments/calibrate_double_sparsity.py) and, as
DoubleSparse's evaluation does, the first 2 layers dense, at token sparsity 1/4, 1/8, 1/16
against dense (the same model with every token kept, which the tests prove equal to dense
attention). The parts (`--parts`, each a few minutes; results are merged into --results_json
so the page can be rebuilt from any subset, `--parts=` only rewrites it):

- perplexity: held-out text (the corpus' validation split, Python source), rows of `ppl_len`
  tokens fed through `extend` in chunks of 64 tokens, so every query selects its own top
  tokens over its causal prefix exactly as a decode step would. Scored on the positions past
  `ds_min_context` = 256 (below it double sparsity is dense by design). Metric ppl_ratio =
  ppl(sparse) / ppl(dense); the issue's goal: <= 1.05 at 1/8.
- ablation: perplexity at 1/8 with the oracle selection (true q.k over all channels: the
  token-selection loss alone) and the README's r = D/4 4-bit labels (`ABLATION`);
  retrieval_ablation: retrieval at 1/8 with those settings.
- retrieval: key-value retrieval (experiments/kv_retrieval.py): facts hidden in ~2k tokens
  of filler, prefilled densely once per prompt; the question and answer are decoded with
  double-sparse attention (retrieval_accuracy).
- block_error: the TPU kernel's block-granular selection against token-level selection, on
  this model's real queries and keys (relative L2 error of the attention output to dense).
- channel_sweep: more label channels (r = 8, 16) and where the attention mass goes.
- quality: the perplexity table, every `QUALITY` setting (r = D/16; the README's r = D/4 at 4
  bits; the oracle; per-query-head selection) at each of `--fractions`, 2 dense layers.

Speedups come from the timed benchmark (experiments/bench/double_sparsity.py, run under the
exclusive CPU lock): pass its JSON lines with --bench_jsonl. Writes the markdown page and a
plot next to it (experiments/results_pages/double_sparsity.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import calibrate_double_sparsity as calib
from experiments import kv_retrieval
from experiments.pretrained import load_pretrained
from experiments.results_pages import double_sparsity as report
from models import double_sparse_calibration as dsc
from pallas_kernels import double_sparse as ds
from pallas_kernels import double_sparse_tpu

FRACTIONS = (1, 4, 8, 16)  # 1 = dense (every token kept)
CHUNK = 64
MIN_CONTEXT = 256


def _ranking(pre):
    path = calib.default_path("smollm2", pre.model.config)
    try:
        return dsc.load_ranking(path, pre.model.config), path
    except ValueError:
        calib.run(model=pre.model, encode=pre.tokenizer.encode, out=path)
        return dsc.load_ranking(path, pre.model.config), path


def _models(pre, ranking, fractions=FRACTIONS):
    """The official evaluation's defaults: r = D/16, first 2 layers dense, 16-bit labels."""
    return {f: dsc.with_double_sparse(pre.model, ranking, ds_token_sparsity=1.0 / f,
                                      ds_min_context=MIN_CONTEXT) for f in fractions}


_extend = nnx.jit(lambda m, t, c, n: m.extend(t, c, num_tokens=n))


def perplexity(models, rows: np.ndarray) -> dict:
    """Per fraction: mean NLL and perplexity on positions >= MIN_CONTEXT (next-token)."""
    b, t = rows.shape
    out = {}
    for f, model in models.items():
        start = time.time()
        cache = model.init_cache(b, t)
        nll = []
        for a in range(0, t, CHUNK):
            chunk = jnp.asarray(rows[:, a:a + CHUNK])
            logits, cache = _extend(model, chunk, cache, jnp.full((b,), chunk.shape[1]))
            logp = jax.nn.log_softmax(logits[:, :-1] if a + CHUNK >= t else logits, axis=-1)
            targets = rows[:, a + 1:a + 1 + logp.shape[1]]
            picked = np.take_along_axis(np.asarray(logp), targets[..., None], axis=-1)[..., 0]
            pos = np.arange(a, a + picked.shape[1])
            nll.append(-picked[:, pos >= MIN_CONTEXT])
        nll = np.concatenate(nll, axis=1)
        out[f] = {"nll": float(nll.mean()), "ppl": float(np.exp(nll.mean())),
                  "tokens": int(nll.size), "seconds": time.time() - start}
        print(json.dumps({"perplexity": f, **out[f]}), flush=True)
    return out


def retrieval(models, tokenizer, trials: int, pairs: int, length: int) -> dict:
    """Key-value retrieval accuracy per fraction (experiments/kv_retrieval.py): one dense
    prefill per prompt, shared by every fraction; the question and answer decode sparsely."""
    prompts = kv_retrieval.make_prompts(tokenizer, trials, pairs, length)
    out = kv_retrieval.evaluate(models, prompts, tokenizer.decode)
    for f in models:
        out[f]["pairs"] = pairs
        print(json.dumps({"retrieval": f, **out[f]}), flush=True)
    return out


# The 1/8 investigation (perplexity): what the official evaluation does that the plain r = D/16
# setting does not, one change at a time. Settings are with_double_sparse overrides.
ABLATION = {
    "oracle": dict(ds_label_channels=64, ds_dense_layers=0),  # true q.k: selection alone
    "oracle_dense2": dict(ds_label_channels=64),
    "r16_4bit_dense2": dict(ds_label_channels=16, ds_label_bits=4),  # the README's setting
    "r16_4bit_dense2_query_head": dict(ds_label_channels=16, ds_label_bits=4,
                                       ds_selection="query_head"),
}


# The quality table: each setting (with_double_sparse overrides; r = D/16 and the first 2
# layers dense unless it says otherwise) at each token fraction.
QUALITY = {
    "r4_dense2": {},
    "r16_4bit_dense2": dict(ds_label_channels=16, ds_label_bits=4),  # the README's setting
    "oracle_dense2": dict(ds_label_channels=64),  # true q.k: the token-selection loss alone
    "r4_dense2_query_head": dict(ds_selection="query_head"),  # the official per-head top-k
    "r16_4bit_dense2_query_head": dict(ds_label_channels=16, ds_label_bits=4,
                                       ds_selection="query_head"),
}


def quality(pre, ranking, rows, names, fractions) -> dict:
    """Perplexity of each QUALITY setting in `names` at each token fraction 1/f."""
    out = {}
    for name in names:
        models = {f: dsc.with_double_sparse(pre.model, ranking, ds_token_sparsity=1.0 / f,
                                            ds_min_context=MIN_CONTEXT, **QUALITY[name])
                  for f in fractions if f != 1}
        print(json.dumps({"quality": name}), flush=True)
        out[name] = perplexity(models, rows)
    return out


def ablation(pre, ranking, rows, names, fraction: int = 8) -> dict:
    """Perplexity at 1/fraction of the tokens for the ABLATION settings `names`."""
    models = {name: dsc.with_double_sparse(pre.model, ranking, ds_token_sparsity=1.0 / fraction,
                                           ds_min_context=MIN_CONTEXT, **ABLATION[name])
              for name in names}
    return perplexity(models, rows)


def block_error(pre, ranking, rows: np.ndarray, layers=(5, 15, 25), block_ks=(16, 64)) -> dict:
    """Relative L2 error to dense attention of the last query of each row, at 1/16 of the
    tokens: token-level Double Sparsity vs the TPU kernel's block-level selection."""
    model = pre.model
    t = rows.shape[1]
    tokens = jnp.asarray(rows)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)

    @nnx.jit
    def qkv_at(m, tokens):
        x, found = m.embed(tokens), []
        for i, block in enumerate(m.blocks):
            if i in layers:
                found.append(block.attn.project(block.attn_norm(x), positions))
            x = block(x, positions)
        return found

    r = max(1, model.config.resolved_head_dim // 16)
    top_k = t // 16
    errors = {"token": []}
    errors.update({f"block{bk}": [] for bk in block_ks})
    for layer, (q, k, v) in zip(layers, qkv_at(model, tokens)):
        channels = jnp.asarray(ranking[layer][:, :r])
        labels = ds.make_labels(k, channels)
        q1 = q[:, -1:]
        kv_len = jnp.full((q.shape[0], 1), t, jnp.int32)
        dense = ds.double_sparse_reference(q1, k, v, labels, channels, kv_len, top_k=t)
        rel = lambda x: float(jnp.linalg.norm(x - dense) / jnp.linalg.norm(dense))  # noqa
        errors["token"].append(rel(ds.double_sparse_reference(
            q1, k, v, labels, channels, kv_len, top_k=top_k)))
        scores = ds.label_scores(q1, labels, channels, kv_len)
        for bk in block_ks:
            count = jnp.full(kv_len.shape, top_k, jnp.int32)
            blk, nv = double_sparse_tpu.select_blocks(scores, count, bk, top_k // bk)
            out = ds.block_reference(q1, k, v, blk, nv, kv_len,
                                                    scale=q.shape[-1] ** -0.5, block_k=bk)
            errors[f"block{bk}"].append(rel(out))
    result = {name: float(np.mean(v)) for name, v in errors.items()}
    result.update(layers=list(layers), top_k=top_k, context=t)
    print(json.dumps({"block_error": result}), flush=True)
    return result


def attention_mass(pre, ranking, row: np.ndarray, layers=(2, 10, 20, 28), queries: int = 32,
                   fraction: int = 8) -> dict:
    """Share of each query's dense attention mass on the tokens Double Sparsity keeps (1/8 of
    the context, group-max label selection) for r = 4, 8, 16 calibrated channels, beside the
    oracle (the true top tokens) and 4 uncalibrated channels: where the quality goes."""
    model = pre.model
    t = row.shape[-1]
    positions = jnp.arange(t)[None]

    @nnx.jit
    def qk_at(m, tokens):
        x, found = m.embed(tokens), []
        for i, block in enumerate(m.blocks):
            if i in layers:
                found.append(block.attn.project(block.attn_norm(x), positions)[:2])
            x = block(x, positions)
        return found

    d = model.config.resolved_head_dim
    settings = {"r=4": 4, "r=8": 8, "r=16": 16}
    out = {name: [] for name in list(settings) + ["oracle", "r=4 first channels"]}
    for layer, (q, k) in zip(layers, qk_at(model, jnp.asarray(row[None]))):
        q, k = np.asarray(q[0]), np.asarray(k[0])
        g = q.shape[1] // k.shape[1]
        for name in out:
            ch = (np.tile(np.arange(4), (k.shape[1], 1)) if name.startswith("r=4 first")
                  else ranking[layer][:, :settings.get(name, d)])
            masses = []
            for pos in range(t - queries, t):
                n, keep = pos + 1, -(-(pos + 1) // fraction)
                for h in range(q.shape[1]):
                    kh = h // g
                    logit = q[pos, h] @ k[:n, kh].T / np.sqrt(d)
                    p = np.exp(logit - logit.max())
                    p /= p.sum()
                    if name == "oracle":
                        masses.append(np.sort(p)[::-1][:keep].sum())
                        continue
                    heads = range(kh * g, kh * g + g)
                    label = np.max([q[pos, x, ch[kh]] @ k[:n, kh, ch[kh]].T for x in heads], 0)
                    masses.append(p[np.argsort(-label)[:keep]].sum())
            out[name].append(float(np.mean(masses)))
    result = {"layers": list(layers), "fraction": fraction, "queries": queries, "mass": out}
    print(json.dumps({"attention_mass": result}), flush=True)
    return result


def channel_sweep(pre, ranking, rows, fraction: int = 8, rs=(8, 16)) -> dict:
    """Perplexity at 1/fraction of the tokens with more label channels than D/16."""
    models = {r: dsc.with_double_sparse(pre.model, ranking, ds_token_sparsity=1.0 / fraction,
                                        ds_min_context=MIN_CONTEXT, ds_label_channels=r,
                                        ds_dense_layers=0)
              for r in rs}
    return {"fraction": fraction, "ppl": {r: v for r, v in perplexity(models, rows).items()}}


def _int_keys(results: dict) -> dict:
    """JSON turned the fraction keys into strings; turn them back."""
    ints = ("perplexity", "perplexity_all_layers", "retrieval")
    out = {name: ({int(k): v for k, v in part.items()} if name in ints else part)
           for name, part in results.items()}
    if "quality" in out:
        out["quality"] = {name: {int(k): v for k, v in part.items()}
                          for name, part in out["quality"].items()}
    if "channel_sweep" in out:
        out["channel_sweep"]["ppl"] = {int(k): v for k, v in out["channel_sweep"]["ppl"].items()}
    return out


PARTS = ("block_error", "perplexity", "retrieval", "ablation", "retrieval_ablation",
         "channel_sweep", "quality")


def measure(parts, args, results: dict) -> tuple[dict, str]:
    """Runs `parts` (each a few minutes on 2 CPUs); returns `results` updated with them and
    the calibration file used."""
    pre = load_pretrained(name="smollm2")
    ranking, cal_path = _ranking(pre)
    rows = calib.corpus_rows(pre.tokenizer.encode, args.ppl_rows, args.ppl_len,
                             split="validation")
    if "block_error" in parts:
        results["block_error"] = block_error(pre, ranking, rows[:2])
    if "perplexity" in parts:
        # Dense (every token kept) does not depend on the double-sparse settings: measured once.
        have_dense = 1 in results.get("perplexity", {})
        fractions = [f for f in args.fractions if not (f == 1 and have_dense)]
        new = perplexity(_models(pre, ranking, fractions), rows)
        results["perplexity"] = {**results.get("perplexity", {}), **new}
    if "retrieval" in parts:
        results["retrieval"] = retrieval(_models(pre, ranking), pre.tokenizer,
                                         args.retrieval_trials, args.retrieval_pairs,
                                         args.retrieval_len)
    if "retrieval_ablation" in parts:  # one prefill per setting: their label caches differ
        prompts = kv_retrieval.make_prompts(pre.tokenizer, args.retrieval_trials,
                                            args.retrieval_pairs, args.retrieval_len)
        names = args.ablation.split(",") if args.ablation else ["r16_4bit_dense2"]
        for name in names:
            model = dsc.with_double_sparse(pre.model, ranking, ds_token_sparsity=1.0 / 8,
                                           ds_min_context=MIN_CONTEXT, **ABLATION[name])
            got = kv_retrieval.evaluate({name: model}, prompts, pre.tokenizer.decode)[name]
            print(json.dumps({"retrieval_ablation": name, **got}), flush=True)
            results.setdefault("retrieval_ablation", {})[name] = got
    if "ablation" in parts:
        names = args.ablation.split(",") if args.ablation else list(ABLATION)
        results["ablation"] = {**results.get("ablation", {}),
                               **ablation(pre, ranking, rows, names)}
    if "quality" in parts:
        names = args.quality.split(",") if args.quality else list(QUALITY)
        got = quality(pre, ranking, rows, names, args.fractions)
        table = results.setdefault("quality", {})
        for name, by_fraction in got.items():
            table[name] = {**table.get(name, {}), **by_fraction}
    if "channel_sweep" in parts:
        results["attention_mass"] = attention_mass(pre, ranking, rows[0, :1024])
        results["channel_sweep"] = channel_sweep(pre, ranking, rows)
    return results, cal_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench_jsonl", default=None)
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to (re)measure, of {PARTS}; the others are "
                        "kept from --results_json (empty: only rewrite the page)")
    p.add_argument("--ablation", default="", help=f"ablation settings to run, of "
                   f"{tuple(ABLATION)} (default all)")
    p.add_argument("--fractions", default="1,4,8,16",
                   help="perplexity, quality: token fractions 1/f to measure (1 = dense)")
    p.add_argument("--quality", default="", help=f"quality settings to run, of "
                   f"{tuple(QUALITY)} (default all)")
    p.add_argument("--ppl_rows", type=int, default=2)
    p.add_argument("--ppl_len", type=int, default=2048)
    p.add_argument("--retrieval_trials", type=int, default=8)
    p.add_argument("--retrieval_pairs", type=int, default=4)
    p.add_argument("--retrieval_len", type=int, default=2048)
    p.add_argument("--out", default="docs/results/double_sparsity.md")
    p.add_argument("--results_json", default="workdirs/double_sparsity/results.json",
                   help="measurements are kept here and merged part by part")
    args = p.parse_args(argv)
    args.fractions = [int(f) for f in args.fractions.split(",") if f]
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; valid: {PARTS}")
    if args.ablation and not set(args.ablation.split(",")) <= set(ABLATION):
        raise ValueError(f"unknown --ablation {args.ablation!r}; valid: {tuple(ABLATION)}")
    if args.quality and not set(args.quality.split(",")) <= set(QUALITY):
        raise ValueError(f"unknown --quality {args.quality!r}; valid: {tuple(QUALITY)}")
    start = time.time()
    results, meta = {}, {"minutes": 0.0}
    if os.path.exists(args.results_json):
        with open(args.results_json) as f:
            saved = json.load(f)
        results, meta = _int_keys(saved["results"]), saved["meta"]
    if parts:
        results, cal_path = measure(parts, args, results)
        meta.update(machine=f"{platform.platform()}, {os.cpu_count()} CPUs",
                    ppl_rows=args.ppl_rows, ppl_len=args.ppl_len, min_context=MIN_CONTEXT,
                    chunk=CHUNK, r=4, calibration=cal_path)
        meta["minutes"] = meta.get("minutes", 0.0) + (time.time() - start) / 60
        meta.setdefault("runs", []).append({"parts": parts, "minutes": (time.time() - start) / 60,
                                            "load_average": os.getloadavg()[0]})
        os.makedirs(os.path.dirname(args.results_json) or ".", exist_ok=True)
        with open(args.results_json, "w") as f:
            json.dump({"results": results, "meta": meta}, f)
    bench = []
    if args.bench_jsonl:
        with open(args.bench_jsonl) as f:
            bench = [json.loads(line) for line in f if line.startswith("{")]
    report.write(results, bench, meta, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
