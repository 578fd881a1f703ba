"""Greedy decoding of a real pretrained model: swiftlm beside Hugging Face transformers and
llama.cpp, all on the same f32 weights, in one run.

The model is SmolLM2-135M-Instruct (Allal et al. 2025, arXiv 2502.02737; Llama architecture,
30 layers, d_model 576, vocab 49152) from the packaged Q4_1 GGUF file (models/packaged.py).
Every framework dequantizes that file to f32 itself: swiftlm with models/convert_gguf.py, HF
with AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), llama.cpp (llama-cpp-python,
when importable) from an F32 copy of the file written once under --workdir. So all three hold
the same numbers, and greedy decoding should produce the same tokens (`tokens_match`; the first
differing [row, position] is reported, never an error).

Prompts are real text: the Python standard library's sources (train/corpus.py), sorted by path,
a different file per row, tokenized without special tokens by HF's tokenizer of the same GGUF
file and cut to exactly the prompt length (files too short are skipped).

Each framework runs in its own subprocess (`--worker`), one after another, never in parallel,
so `peak_rss_mib` (VmHWM at the worker's end) is that framework's own peak, loading
included; `rss_after_load_mib` and `rss_end_mib` sit beside it. For each case every side times
whole calls of N = --new_tokens new tokens and of 1 new token (best of --repeats each, after a
warm-up: swiftlm's compilation, HF's first-call allocations); the difference is the N - 1
decode steps, so decode tokens/s = batch * (N - 1) / (t_N - t_1), prefill excluded. No EOS on
any side. The setups: swiftlm generate(sampler="greedy", eos_id=None); HF as in
experiments/bench/decode.py (torch.inference_mode, all CPU threads or --torch_threads, the KV
cache, do_sample=False, min_new_tokens = max_new_tokens); llama.cpp Llama.generate with
top_k=1, temp=0 after reset(), n_threads = os.cpu_count().

Metrics (one JSON line each; case b{batch}_p{prompt_len}):
  speedup_vs_hf          swiftlm decode tokens/s / HF's (goal 2.0 at batch 1, 1.5 at batch 8)
  bandwidth_fraction     batch 1: swiftlm decode tokens/s / (copy bandwidth / bytes per token)
                         as in decode.py: f32 weights + the K/V of the mean context of the timed
                         steps (prompt + N/2); the bandwidth is measured by the parent after the
                         workers, in the same run (goal 0.6)
  speedup_vs_llamacpp    swiftlm decode tokens/s / llama.cpp's; batch 1 only (llama-cpp-python's
                         high-level API decodes one sequence); null with a `reason` otherwise
  bf16_speedup_vs_f32    swiftlm bf16 decode tokens/s / f32's (load_gguf(dtype="bfloat16") and
                         every floating weight cast to bf16); its tokens_match compares the
                         bf16 tokens with the f32 ones (they may well differ)
  prefill_speedup_vs_hf  case b1_p{--prefill_len}: HF time / swiftlm time to fill a fresh cache
                         with the prompt and compute the last position's logits (swiftlm:
                         jit of extend_trunk + logits of the last state; HF: forward with
                         use_cache=True, logits_to_keep=1); both tokens/s in the line
  peak_rss_mib           per framework (case swiftlm, swiftlm_bf16, hf, llamacpp), and
  peak_rss_ratio_vs_hf   swiftlm's and llama.cpp's over HF's
  bf16_logit_rel_error   bf16 vs f32 logits of 4 prompts of 128 tokens: max |difference| /
                         max |f32 logit|; bf16_top1_agreement: argmax agreement, all positions

    python -m experiments.bench.real_model [--batches 1,8] [--prompt_lens 128,1024]
        [--cases b1_p128,...] [--new_tokens 256] [--prefill_len 2048] [--repeats 1]
        [--dtypes float32,bfloat16] [--frameworks swiftlm,hf,llamacpp]
        [--workdir workdirs/bench_real_model] [--torch_threads N]

Every line records the machine and the 1-minute load average: other processes skew the times.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys

import numpy as np

from experiments.bench.real_model_workers import (WORKERS, f32_gguf_path, run_worker,
                                                  write_f32_gguf)

BENCH = "real_model"
MODEL = "smollm2"
FRAMEWORKS = tuple(WORKERS)
DTYPES = ("float32", "bfloat16")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOALS = {("speedup_vs_hf", 1): 2.0, ("speedup_vs_hf", 8): 1.5, ("bandwidth_fraction", 1): 0.6}
LLAMACPP_BATCH = ("llama-cpp-python's high-level API (Llama.generate / eval) decodes one "
                  "sequence at a time, so only batch-1 cases are compared")


def make_prompts(gguf_path: str, rows: int, length: int) -> tuple[np.ndarray, list[str]]:
    """int32[rows, length] token ids, row r from the r-th sorted stdlib file that holds at
    least `length` tokens, and those files' paths."""
    from transformers import AutoTokenizer

    from train.corpus import list_stdlib_files, stdlib_root

    directory, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    root = stdlib_root()
    ids, files = [], []
    for rel in list_stdlib_files(root):
        # Source code runs ~3-4 characters per token; 16 leaves room and bounds the work.
        text = (root / rel).read_text(encoding="utf-8", errors="replace")[:16 * length]
        row = tokenizer(text, add_special_tokens=False)["input_ids"] if len(text) >= length else []
        if len(row) >= length:
            ids.append(row[:length])
            files.append(rel)
            if len(ids) == rows:
                return np.asarray(ids, np.int32), files
    raise ValueError(f"only {len(ids)} stdlib files hold {length} tokens; {rows} are needed")


def _spawn(args, framework: str, dtype: str, prompts: str) -> dict:
    """Runs one worker process to its end and returns its result (its stdout's last line)."""
    cmd = [sys.executable, "-m", "experiments.bench.real_model", "--worker", framework,
           "--dtypes", dtype, "--cases", ",".join(args.cases), "--new_tokens",
           str(args.new_tokens), "--prefill_len", str(args.prefill_len), "--repeats",
           str(args.repeats), "--workdir", args.workdir, "--prompts", prompts,
           "--gguf", args.gguf]
    if args.torch_threads:
        cmd += ["--torch_threads", str(args.torch_threads)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"the {framework} ({dtype}) worker failed with exit code "
                           f"{proc.returncode}; its stderr is above")
    return json.loads(lines[-1])


def _decode(res: dict | None, case: str, batch: int, new_tokens: int) -> dict | None:
    """Decode tokens/s and the times of one worker's case (None if it did not run it)."""
    if res is None or case not in res["cases"]:
        return None
    c = res["cases"][case]
    decode_s = c["tn_s"] - c["t1_s"]
    return {"tokens_per_s": batch * (new_tokens - 1) / decode_s if decode_s > 0 else None,
            "t1_s": round(c["t1_s"], 4), "tn_s": round(c["tn_s"], 4),
            "call_tokens_per_s": round(batch * new_tokens / c["tn_s"], 1),
            "tokens": c["tokens"]}


def first_mismatch(a: list, b: list) -> list | None:
    """[row, position] of the first differing token (shapes if they differ), None if equal."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return [list(a.shape), list(b.shape)]
    diff = np.argwhere(a != b)
    return None if diff.size == 0 else diff[0].tolist()


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if not num or not den else round(num / den, 3)


def _pair(line: dict, ours: dict, other: dict, name: str) -> dict:
    """Both sides' decode numbers and whether their tokens agree, added to `line`."""
    for who, d in (("ours", ours), (name, other)):
        line.update({f"{who}_decode_tokens_per_s": d["tokens_per_s"] and round(
            d["tokens_per_s"], 1), f"{who}_t1_s": d["t1_s"], f"{who}_tn_s": d["tn_s"],
            f"{who}_call_tokens_per_s": d["call_tokens_per_s"]})
    if ours["tokens_per_s"] is None or other["tokens_per_s"] is None:
        line["reason"] = ("t_N <= t_1 on one side: timing noise swamped the decode steps "
                          "(raise --new_tokens or --repeats)")
    mismatch = first_mismatch(ours["tokens"], other["tokens"])
    return {**line, "tokens_match": mismatch is None, "first_mismatch": mismatch}


def combine(args, results: dict, reasons: dict, common: dict) -> list[dict]:
    """The JSON lines from the workers' results ({(framework, dtype): result})."""
    from experiments.bench.decode import (bytes_per_token, measure_copy_bandwidth,
                                          measure_memcpy_bandwidth)
    from models.transformer import TransformerConfig

    ours, hf = results.get(("swiftlm", "float32")), results.get(("hf", "float32"))
    bf16, llama = results.get(("swiftlm", "bfloat16")), results.get(("llamacpp", "float32"))
    bandwidth = memcpy = None
    if ours and any(c.startswith("b1_") for c in args.cases):
        bandwidth, memcpy = measure_copy_bandwidth(), measure_memcpy_bandwidth()
    n = args.new_tokens
    lines = []
    for case in args.cases:
        batch, prompt_len = _parse_case(case)
        base = {"bench": BENCH, "case": case, "batch": batch, "prompt_len": prompt_len,
                "new_tokens": n, **common}
        d = {k: _decode(r, case, batch, n) for k, r in
             (("ours", ours), ("hf", hf), ("bf16", bf16), ("llamacpp", llama))}
        if d["ours"] and d["hf"]:
            lines.append(_pair({**base, "metric": "speedup_vs_hf", "value": _ratio(
                d["ours"]["tokens_per_s"], d["hf"]["tokens_per_s"]),
                "goal": GOALS.get(("speedup_vs_hf", batch))}, d["ours"], d["hf"], "hf"))
        if d["ours"] and batch == 1:
            config = TransformerConfig(**ours["config"])
            need = bytes_per_token(config, ours["num_params"], prompt_len + n / 2)
            floor = bandwidth / need["total"]
            tps = d["ours"]["tokens_per_s"]
            lines.append({**base, "metric": "bandwidth_fraction", "value": _ratio(tps, floor),
                          "goal": GOALS[("bandwidth_fraction", 1)],
                          "ours_decode_tokens_per_s": tps and round(tps, 1),
                          "hf_bandwidth_fraction": d["hf"] and _ratio(
                              d["hf"]["tokens_per_s"], floor),
                          "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
                          "memcpy_bandwidth_gb_s": round(memcpy / 1e9, 2),
                          "bytes_per_token": need, "floor_tokens_per_s": round(floor, 1)})
        if d["ours"] and d["llamacpp"]:
            lines.append(_pair({**base, "metric": "speedup_vs_llamacpp", "value": _ratio(
                d["ours"]["tokens_per_s"], d["llamacpp"]["tokens_per_s"]), "goal": None},
                d["ours"], d["llamacpp"], "llamacpp"))
        elif d["ours"] and llama and batch > 1:
            lines.append({**base, "metric": "speedup_vs_llamacpp", "value": None,
                          "goal": None, "reason": LLAMACPP_BATCH})
        if d["ours"] and d["bf16"]:
            lines.append(_pair({**base, "metric": "bf16_speedup_vs_f32", "value": _ratio(
                d["bf16"]["tokens_per_s"], d["ours"]["tokens_per_s"]), "goal": None},
                d["ours"], d["bf16"], "bf16"))
    if "llamacpp" in reasons:
        lines.append({"bench": BENCH, "case": "all", "metric": "speedup_vs_llamacpp",
                      "value": None, "goal": None, "reason": reasons["llamacpp"], **common})
    if ours and hf and "prefill" in ours and "prefill" in hf:
        tokens, ours_s, hf_s = ours["prefill"]["tokens"], ours["prefill"]["s"], hf["prefill"]["s"]
        lines.append({"bench": BENCH, "case": f"b1_p{tokens}", "metric": "prefill_speedup_vs_hf",
                      "value": _ratio(hf_s, ours_s), "goal": None, "prompt_len": tokens,
                      "ours_prefill_tokens_per_s": round(tokens / ours_s, 1),
                      "hf_prefill_tokens_per_s": round(tokens / hf_s, 1),
                      "ours_s": round(ours_s, 4), "hf_s": round(hf_s, 4), **common})
    for (framework, dtype), res in results.items():
        case = framework if dtype == "float32" else f"{framework}_bf16"
        line = {"bench": BENCH, "case": case, "metric": "peak_rss_mib",
                "value": res["final"]["peak_rss_mib"], "goal": None,
                "rss_after_load_mib": res["after_load"]["rss_mib"],
                "peak_rss_after_load_mib": res["after_load"]["peak_rss_mib"],
                "rss_end_mib": res["final"]["rss_mib"], "load_s": res["load_s"],
                "worker_load_avg_1m": res["load_avg_1m"], **common}
        if dtype != "float32":
            line["note"] = "includes loading the f32 model for the logit comparison first"
        lines.append(line)
        if hf and framework != "hf" and dtype == "float32":
            lines.append({**line, "metric": "peak_rss_ratio_vs_hf", "value": _ratio(
                res["final"]["peak_rss_mib"], hf["final"]["peak_rss_mib"]),
                "hf_peak_rss_mib": hf["final"]["peak_rss_mib"]})
    if bf16 and "logit_agreement" in bf16:
        agreement = bf16["logit_agreement"]
        for metric, key in (("bf16_logit_rel_error", "rel_error"), ("bf16_top1_agreement", "top1")):
            lines.append({"bench": BENCH, "case": "b4_p128", "metric": metric,
                          "value": round(agreement[key], 6), "goal": None,
                          "positions": agreement["positions"], **common})
    return lines


def run(args) -> list[dict]:
    """Tokenizes the prompts, runs the workers one after another and prints the lines."""
    from models.packaged import packaged_gguf

    model_name = MODEL if args.gguf is None else os.path.basename(args.gguf)
    args.gguf = args.gguf or packaged_gguf(MODEL)
    os.makedirs(args.workdir, exist_ok=True)
    bf16 = "swiftlm" in args.frameworks and "bfloat16" in args.dtypes
    rows = max([_parse_case(c)[0] for c in args.cases] + [4 if bf16 else 1])
    length = max([_parse_case(c)[1] for c in args.cases] + [args.prefill_len, 128 if bf16 else 1])
    ids, files = make_prompts(args.gguf, rows, length)
    prompts = os.path.join(args.workdir, f"prompts-{os.getpid()}.npz")
    np.savez(prompts, ids=ids)
    results, reasons = {}, {}
    try:
        for framework in args.frameworks:
            if framework == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
                reasons[framework] = ("llama_cpp (llama-cpp-python) is not importable here; "
                                      "pip install llama-cpp-python to add the third column")
                continue
            if framework == "llamacpp" and not os.path.isfile(f32_gguf_path(args.workdir,
                                                                             args.gguf)):
                write_f32_gguf(args.gguf, f32_gguf_path(args.workdir, args.gguf))
            for dtype in args.dtypes if framework == "swiftlm" else ("float32",):
                try:
                    results[(framework, dtype)] = _spawn(args, framework, dtype, prompts)
                except RuntimeError as e:
                    if framework != "llamacpp":
                        raise
                    reasons[framework] = str(e)
    finally:
        os.remove(prompts)
    common = {"model": model_name, "gguf": os.path.basename(args.gguf), "cpus": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version(),
              "versions": {k: v for r in results.values() for k, v in r["versions"].items()},
              "prompt_files": files, "load_avg_1m": round(os.getloadavg()[0], 2)}
    if ("hf", "float32") in results:
        common["torch_threads"] = results[("hf", "float32")]["torch_threads"]
    lines = combine(args, results, reasons, common)
    for line in lines:
        print(json.dumps(line), flush=True)
    return lines


def _parse_case(case: str) -> tuple[int, int]:
    match = re.fullmatch(r"b(\d+)_p(\d+)", case)
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise ValueError(f"case {case!r} is not b<batch>_p<prompt_len> (e.g. b1_p128)")
    return int(match.group(1)), int(match.group(2))


def _csv(text: str) -> list[str]:
    return [s for s in text.split(",") if s]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt_lens", default="128,1024", help="comma-separated prompt lengths")
    p.add_argument("--cases", default="", help="comma-separated b<batch>_p<prompt_len> cases "
                   "(default: every --batches x --prompt_lens pair)")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--prefill_len", type=int, default=2048, help="0 skips the prefill case")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per side; best is kept")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"swiftlm dtypes from {DTYPES}")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"from {FRAMEWORKS}")
    p.add_argument("--workdir", default=os.path.join("workdirs", "bench_real_model"))
    p.add_argument("--torch_threads", type=int, default=None,
                   help="threads for the HF side (default: os.cpu_count())")
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)  # internal
    p.add_argument("--prompts", help=argparse.SUPPRESS)  # internal: the parent's .npz
    p.add_argument("--gguf", help="a GGUF file to load instead of the packaged "
                   f"{MODEL} (the tests use a tiny random one)")
    args = p.parse_args(argv)
    try:
        args.cases = _csv(args.cases) or [f"b{b}_p{n}" for b in _csv(args.batches)
                                          for n in _csv(args.prompt_lens)]
        for case in args.cases:
            _parse_case(case)
    except ValueError as e:
        p.error(str(e))
    args.dtypes, args.frameworks = _csv(args.dtypes), _csv(args.frameworks)
    if not args.dtypes or set(args.dtypes) - set(DTYPES):
        p.error(f"--dtypes={args.dtypes}: valid are {DTYPES}")
    if not args.frameworks or set(args.frameworks) - set(FRAMEWORKS):
        p.error(f"--frameworks={args.frameworks}: valid are {FRAMEWORKS}")
    if args.new_tokens < 2 or args.repeats < 1 or args.prefill_len < 0:
        p.error("--new_tokens must be >= 2 (decode speed is t_N - t_1), --repeats >= 1, "
                "--prefill_len >= 0")
    args.workdir = os.path.abspath(args.workdir)
    return args


def main(argv: list[str] | None = None) -> list[dict] | None:
    args = _parse_args(argv)
    if args.worker:
        run_worker(args)
        return None
    return run(args)


if __name__ == "__main__":
    main()
