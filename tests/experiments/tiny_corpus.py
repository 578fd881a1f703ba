"""A tiny python_stdlib dataset for tests that launch training runs in subprocesses (sweeps,
multi-process launches, notebooks): a few dozen short files of the real stdlib, built once
into a data dir that `DataConfig.data_dir` or $SWIFTLM_DATA_DIR then points at.

The builder's version names the running Python, so a launch that finds this build in its data
dir reuses it instead of walking the real standard library.
"""
import pathlib

from train import corpus

# Files of the real stdlib whose text (cut to a few KB) becomes the fake tree.
_SOURCES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py")


def build(data_dir: str | pathlib.Path, *, train_files: int = 24) -> str:
    """Builds the tiny corpus into `data_dir` (no-op if built); returns data_dir as a str."""
    data_dir = pathlib.Path(data_dir)
    root = data_dir / "fake_stdlib"
    texts = [(corpus.stdlib_root() / name).read_text(encoding="utf-8")[:4000]
             for name in _SOURCES]
    counts = {"train": 0, "validation": 0}
    wanted = {"train": train_files, "validation": 2}
    i = 0
    while counts != wanted:   # names chosen so that both splits get files
        rel = f"pkg/mod_{i}.py"
        split = corpus.split_of(rel)
        if counts[split] < wanted[split]:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(texts[i % len(texts)], encoding="utf-8")
            counts[split] += 1
        i += 1
    corpus.build_stdlib_dataset(data_dir, root=root)
    return str(data_dir)


def compile_cache(tmp_path_factory) -> str:
    """A jax compilation cache shared by every test process of this session (xdist workers
    too), so the launches that different tests run with the same shapes compile once."""
    path = tmp_path_factory.getbasetemp().parent / "jax_compile_cache"
    path.mkdir(exist_ok=True)
    return str(path)


def tiny_bindings(data_dir: str, steps: int = 3, checkpoint_every: int = 1) -> list[str]:
    """Gin bindings that shrink baseline_tiny.gin to seconds of CPU: one 32-wide layer,
    batches of 4 x 32 bytes from the tiny corpus in `data_dir`."""
    return ["TransformerConfig.d_model = 32", "TransformerConfig.n_layers = 1",
            "TransformerConfig.n_heads = 2", "TransformerConfig.n_kv_heads = 1",
            "DataConfig.seq_len = 32", "DataConfig.batch_size = 4",
            "DataConfig.read_threads = 0", "DataConfig.prefetch_batches = 0",
            f"DataConfig.data_dir = {data_dir!r}", f"TrainConfig.steps = {steps}",
            "TrainConfig.warmup_steps = 1", "TrainConfig.eval_batches = 1",
            f"TrainConfig.checkpoint_every = {checkpoint_every}", "TrainConfig.log_every = 1"]
