"""The per-framework halves of experiments/bench/real_model.py, each run in its own process.

A worker loads SmolLM2-135M-Instruct from the packaged GGUF file with one framework, times
greedy decoding of the prompts the parent tokenized (an .npz file) and prints one JSON dict as
the last line of its stdout: per case the best time of a 1-new-token call and of an
N-new-token call and the N tokens, optionally a prefill time, and the process's peak resident
memory (VmHWM, read last, so it covers loading as well as decoding).

    swiftlm   load_gguf (f32, or bf16 compute with every floating weight cast to bf16);
              generate(..., eos_id=None, max_length=M) with the same M for both calls, so the
              1-token call compiles everything the N-token call runs (max_new_tokens is traced)
    hf        AutoModelForCausalLM from the same GGUF file, f32, decode.py's _time_hf setup
    llamacpp  llama-cpp-python on an F32 copy of the GGUF file (write_f32_gguf), batch 1 only
"""
from __future__ import annotations

import json
import os
import resource
import time

import numpy as np

MIB = 2 ** 20


def _rss() -> dict:
    """Peak resident memory so far and the current one, in MiB. The peak is /proc's VmHWM,
    not ru_maxrss: Linux carries ru_maxrss across exec, so a worker spawned by a big parent
    (a pytest process, say) would report the parent's peak as its own."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024  # kB
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    return {"peak_rss_mib": round(peak, 1), "rss_mib": round(current, 1)}


# Extra rounds allowed, beyond `repeats`, while the best t_N is not yet above the best t_1: a
# small model decodes a token in tens of microseconds, so on a busy machine one preempted call
# can swamp the whole decode and leave t_N - t_1 <= 0.
MAX_EXTRA_ROUNDS = 20


def _best_pair(call, new_tokens: int, repeats: int):
    """Best wall times of call(1) and call(new_tokens) over at least `repeats` rounds (more, up
    to MAX_EXTRA_ROUNDS, while t_N <= t_1), interleaved so that load from other processes
    falls on both; returns (t_1, t_N, tokens of the N call)."""
    best_1 = best_n = float("inf")
    tokens = None
    rounds = 0
    while rounds < repeats or (best_n <= best_1 and rounds < repeats + MAX_EXTRA_ROUNDS):
        rounds += 1
        start = time.perf_counter()
        call(1)
        best_1 = min(best_1, time.perf_counter() - start)
        start = time.perf_counter()
        tokens = call(new_tokens)
        best_n = min(best_n, time.perf_counter() - start)
    return best_1, best_n, np.asarray(tokens).tolist()


def _case_prompts(ids: np.ndarray, case: str) -> np.ndarray:
    batch, prompt_len = (int(x) for x in case[1:].split("_p"))
    return np.ascontiguousarray(ids[:batch, :prompt_len])


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    import jax
    from flax import nnx

    graph, weights = nnx.split(model)
    fn = jax.jit(lambda w, t: nnx.merge(graph, w)(t).logits)
    return np.asarray(fn(weights, tokens), np.float32)


def swiftlm_worker(args, ids: np.ndarray) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from decoding.generate import generate, prompt_bucket
    from experiments.pretrained import cast_weights
    from models.convert_gguf import load_gguf

    dtype = args.dtypes[0]
    result: dict = {"framework": "swiftlm", "dtype": dtype, "cases": {},
                    "versions": {"jax": jax.__version__}, "jax_backend": jax.default_backend()}
    reference = None
    if dtype != "float32":  # f32 logits first, for the agreement check; freed before timing
        f32_model, _ = load_gguf(args.gguf)
        reference = _logits(f32_model, ids[:4, :128])
        del f32_model
    start = time.perf_counter()
    model, _ = load_gguf(args.gguf, dtype=dtype)
    if dtype != "float32":
        model = cast_weights(model, dtype)
    result.update(load_s=round(time.perf_counter() - start, 2), after_load=_rss(),
                  num_params=int(model.num_params()), config=dict(model.config.__dict__))
    if reference is not None:
        logits = _logits(model, ids[:4, :128])
        result["logit_agreement"] = {
            "rel_error": float(np.max(np.abs(logits - reference)) / np.max(np.abs(reference))),
            "top1": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
            "positions": int(reference.shape[0] * reference.shape[1])}

    for case in args.cases:
        prompts = _case_prompts(ids, case)
        # generate's own buffer for new_tokens, pinned so the 1-token call shares it.
        length = 1 << (prompt_bucket(prompts.shape[1]) + args.new_tokens - 1).bit_length()

        def call(n):  # returns host lists, so the device work is finished
            return generate(model, prompts, sampler="greedy", max_new_tokens=n, eos_id=None,
                            max_length=length).tokens
        call(1)  # compiles prefill and loop for these shapes (warm-up, not timed)
        t1, tn, tokens = _best_pair(call, args.new_tokens, args.repeats)
        result["cases"][case] = {"t1_s": t1, "tn_s": tn, "tokens": tokens}

    if args.prefill_len and dtype == "float32":
        # extend_trunk through every block, then the head on the last position only: what a
        # prefill needs (model.extend would run the head at all positions, and XLA does not
        # drop the unused rows), and what HF's logits_to_keep=1 computes.
        graph, weights = nnx.split(model)
        n_layers = model.config.n_layers

        @jax.jit
        def prefill(w, tokens):
            m = nnx.merge(graph, w)
            x, cache = m.extend_trunk(tokens, m.init_cache(*tokens.shape), exit_layer=n_layers)
            return m.logits(x[:, -1:]), cache
        tokens = jnp.asarray(ids[:1, :args.prefill_len])
        jax.block_until_ready(prefill(weights, tokens))  # compile
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(prefill(weights, tokens))
            best = min(best, time.perf_counter() - start)
        result["prefill"] = {"tokens": args.prefill_len, "s": best}
    return result


def hf_worker(args, ids: np.ndarray) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.torch_threads or os.cpu_count())
    directory, name = os.path.split(args.gguf)
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                              dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # no EOS: both sides decode exactly N tokens
    hf.generation_config.pad_token_id = 0     # never used (no padding); silences a warning
    result: dict = {"framework": "hf", "dtype": "float32", "cases": {},
                    "load_s": round(time.perf_counter() - start, 2), "after_load": _rss(),
                    "torch_threads": torch.get_num_threads(),
                    "versions": {"torch": torch.__version__,
                                 "transformers": transformers.__version__}}
    with torch.inference_mode():
        for case in args.cases:
            input_ids = torch.from_numpy(_case_prompts(ids, case).astype(np.int64))
            mask = torch.ones_like(input_ids)

            def call(n):
                out = hf.generate(input_ids, attention_mask=mask, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, use_cache=True)
                return out[:, input_ids.shape[1]:].numpy()
            call(min(8, args.new_tokens))  # warm-up: the first call only allocates
            t1, tn, tokens = _best_pair(call, args.new_tokens, args.repeats)
            result["cases"][case] = {"t1_s": t1, "tn_s": tn, "tokens": tokens}
        if args.prefill_len:
            input_ids = torch.from_numpy(ids[:1, :args.prefill_len].astype(np.int64))

            def forward():  # a fresh cache filled, logits of the last position only
                return hf(input_ids, use_cache=True, logits_to_keep=1)
            forward()  # warm-up
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                forward()
                best = min(best, time.perf_counter() - start)
            result["prefill"] = {"tokens": args.prefill_len, "s": best}
    return result


def write_f32_gguf(src: str, dst: str) -> None:
    """Copies GGUF file `src` to `dst` with every tensor dequantized to F32: all metadata
    (tokenizer included) as it is but general.file_type, tensors in the file's own (llama.cpp)
    layout and order. Written to a temporary name and renamed (convert_gguf.gguf_writer)."""
    import gguf
    from gguf import quants

    from models.convert_gguf import gguf_writer

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    with gguf_writer(dst, arch) as writer:  # writes general.architecture itself
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for tensor in reader.tensors:
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # numpy order
            values = quants.dequantize(tensor.data, tensor.tensor_type)
            writer.add_tensor(tensor.name, np.asarray(values, np.float32).reshape(shape))


def f32_gguf_path(workdir: str, gguf_path: str) -> str:
    """Where the F32 copy of `gguf_path` for llama.cpp is cached."""
    return os.path.join(workdir, os.path.basename(gguf_path).replace(".gguf", ".F32.gguf"))


def llamacpp_worker(args, ids: np.ndarray) -> dict:
    import llama_cpp

    path = f32_gguf_path(args.workdir, args.gguf)  # the parent wrote it (not counted here)
    cases = [c for c in args.cases if c.startswith("b1_")]  # the high-level API: one sequence
    n_ctx = max([int(c.split("_p")[1]) for c in cases] + [16]) + args.new_tokens
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=os.cpu_count(),
                          logits_all=False, verbose=False)
    result: dict = {"framework": "llamacpp", "dtype": "float32", "cases": {}, "gguf_f32": path,
                    "load_s": round(time.perf_counter() - start, 2), "after_load": _rss(),
                    "n_ctx": n_ctx, "versions": {"llama_cpp": llama_cpp.__version__}}
    for case in cases:
        prompt = _case_prompts(ids, case)[0].tolist()

        def call(n):
            llm.reset()  # n_tokens = 0, so generate cannot reuse the last call's prompt cache
            out = []
            # generate clears and reuses the list it is given, so it gets a fresh copy.
            for token in llm.generate(list(prompt), top_k=1, top_p=1.0, min_p=0.0,
                                      temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(int(token))  # no EOS check: generate itself never stops
                if len(out) == n:
                    break
            return [out]
        call(min(8, args.new_tokens))  # warm-up
        t1, tn, tokens = _best_pair(call, args.new_tokens, args.repeats)
        result["cases"][case] = {"t1_s": t1, "tn_s": tn, "tokens": tokens}
    return result


WORKERS = {"swiftlm": swiftlm_worker, "hf": hf_worker, "llamacpp": llamacpp_worker}


def run_worker(args) -> None:
    """The --worker entry point: runs one framework and prints its result as the last line of
    stdout, with the peak resident memory read at the very end."""
    with np.load(args.prompts) as data:
        ids = data["ids"]
    result = WORKERS[args.worker](args, ids)
    result.update(final=_rss(), load_avg_1m=round(os.getloadavg()[0], 2))
    print(json.dumps(result), flush=True)
