"""Synthetic tasks with checkable answers, generated in code: a dataset by name
("synthetic_tasks") for measuring what parallel decoding of a masked diffusion LM costs in
quality (decoding/diffusion/; spec decoding.md section 6, "a synthetic task with a tiny masked
diffusion LM trained with section 4.1").

Tasks (byte tokens; answers of 32-64 tokens so that parallel decoding matters):
    copy      "copy:<s>=" -> s                   (s: min_len..max_len letters a-p)
    shift     "shift:<s>=" -> each letter of s moved one on, a-p cyclically (p -> a)
    reverse   "rev:<s>="  -> s reversed          (s: min_len..max_len letters a-p)
    sort      "sort:<s>=" -> s's letters sorted  (s: min_len..max_len letters a-h)
    add       "add:<a>+<b>=" -> a + b            (a, b: decimal numbers of min_len // 2..
              max_len // 2 digits; answers are shorter, ~16-20 tokens)
    add_lsd   "add:<a>+<b>=" -> a + b, every number written least-significant digit first
              (a, b: n = min_len..max_len digits each; answers of n or n + 1 digits)
    either    "any:<s>=" -> s or shift(s), drawn at random per example: both answers are
              correct, so the answer distribution has two modes
    alternate "alt:<x><y>=" -> xyxy... or yxyx... (x, y: two distinct letters of a-zA-Z; answers
              of min_len..max_len letters): either answer is correct, scored by validity
    permute   "perm:<s>=" -> any permutation of s (s: min_len..max_len DISTINCT letters of
              the 32 letters a-zA-F, so with 32 every prompt holds each letter once); trained
              on random permutations, scored by validity (the answer's letters are exactly
              s's), not exact match

Answer tokens that depend on each other are what make committing many per step risky; copy
and shift, whose tokens each depend on one prompt position alone, saturate every sampler (yet
they are what the shipped experiments/configs/diffusion_task_tiny.gin trains on). `either`
and `add_lsd` have dependent answer tokens: in `either` each token alone is a coin flip
between two letters, but one committed token fixes all the others, so committing several
from the all-masked state can mix the two answers; in `add_lsd` (written LSD first, a_{i-1},
b_{i-1} and c_{i-1} fix carry_i) a carry through a run of a_j + b_j = 9 is uncertain from an
all-masked answer. The tiny model learned neither within the CPU budget
(docs/results/diffusion_samplers.md, notes). `alternate` is the dependent task it does learn (in
~4000 steps): from the all-masked answer every position is a coin flip between x and y, but each
letter differs from its neighbours and equals the letters two apart, so a committed letter fixes
the others. Committing several tokens from their marginals in one step risks two equal
neighbours (the joint-vs-marginal failure of parallel decoding), while a one-token-per-step
decoder conditions each choice on what it committed. The coupling relates letters at fixed
relative offsets (copy-like attention with RoPE), which the tiny model picks up; tasks whose
coupling needs a comparison or a count did not train in 2000 steps: `permute` (any permutation
of 32 distinct letters: the model stayed at the uniform-letter loss, committing letters it had
already used; drawn from 52 letters it did not even learn which letters the prompt holds) and
a running-parity task (dropped). `is_correct` scores tasks with several
correct answers (`MANY_ANSWERS`) by validity, the others by exact match; `accuracy_kind` names
which.

Examples are SFT rows in LLaDA's layout: BOS + prompt, then the answer padded with EOS to
`gen_length` tokens, then padding. `loss_mask` is 1 exactly on the gen_length answer slots
(EOS padding included, as LLaDA scores it), so the masked diffusion loss never masks the
prompt. `targets` equals `inputs`: a masked diffusion LM predicts tokens in place, so these
batches are not next-token batches.

Held-out prompts: a problem belongs to the validation split when a hash of its text falls in
one bucket in ten, and only there; the train split never yields it, whatever the seed.
Example i of a split is a pure function of (seed, split, i), so the iterator (a grain
MapDataset) checkpoints and resumes exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib

import gin
import grain
import numpy as np

DATASET_NAME = "synthetic_tasks"
TASKS = ("copy", "shift", "reverse", "sort", "add", "add_lsd", "either", "alternate",
         "permute")
# Tasks with more than one correct answer: accuracy is validity (any correct answer counts).
MANY_ANSWERS = ("either", "alternate", "permute")
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PERMUTE_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEF"   # 32 letters
SPLITS = ("train", "validation")
# Byte tokenizer ids (train/tokenizer.py ByteTokenizer).
BOS, EOS, PAD = 256, 257, 258


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SyntheticTaskConfig:
    tasks: tuple[str, ...] = ("reverse", "sort")
    min_len: int = 32
    max_len: int = 40
    gen_length: int = 64

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"SyntheticTaskConfig.tasks={self.tasks!r}: valid tasks {TASKS}")
        if not 2 <= self.min_len <= self.max_len:
            raise ValueError(f"need 2 <= min_len={self.min_len} <= max_len={self.max_len}")
        if self.max_len > self.gen_length:
            raise ValueError(f"max_len={self.max_len} answers do not fit "
                             f"gen_length={self.gen_length}")
        if "permute" in self.tasks and self.max_len > len(PERMUTE_ALPHABET):
            raise ValueError(f"max_len={self.max_len}: permute draws distinct letters, so "
                             f"max_len must be <= {len(PERMUTE_ALPHABET)}")

    @property
    def max_prompt_length(self) -> int:
        """BOS + the longest prompt ("add:" + two numbers + "+" + "=" is the longest)."""
        longest = 2 * self.max_len if "add_lsd" in self.tasks else self.max_len
        return 1 + max(len("shift:") + self.max_len + 1, len("add:") + longest + 2)


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    prompt: list[int]   # BOS + prompt bytes
    answer: list[int]   # answer bytes (no EOS)
    others: tuple[tuple[int, ...], ...] = ()   # other correct answers


def _shift(s: str) -> str:
    return "".join(chr(97 + (ord(ch) - 97 + 1) % 16) for ch in s)


def _problem(task: str, rng: np.random.Generator, c: SyntheticTaskConfig
             ) -> tuple[str, str, tuple[str, ...]]:
    """(prompt, the answer, other correct answers)."""
    n = int(rng.integers(c.min_len, c.max_len + 1))
    if task in ("copy", "shift", "either"):
        s = "".join(chr(97 + i) for i in rng.integers(0, 16, n))
        if task == "copy":
            return f"copy:{s}=", s, ()
        if task == "shift":
            return f"shift:{s}=", _shift(s), ()
        answers = (s, _shift(s)) if rng.integers(2) == 0 else (_shift(s), s)
        return f"any:{s}=", answers[0], answers[1:]
    if task == "alternate":
        x, y = rng.choice(list(LETTERS), 2, replace=False)
        answers = [((x + y) * n)[:n], ((y + x) * n)[:n]]
        first = int(rng.integers(2))
        return f"alt:{x}{y}=", answers[first], (answers[1 - first],)
    if task == "permute":
        s = "".join(rng.permutation(list(PERMUTE_ALPHABET))[:n])
        return f"perm:{s}=", "".join(rng.permutation(list(s))), ()
    if task == "reverse":
        s = "".join(chr(97 + i) for i in rng.integers(0, 16, n))
        return f"rev:{s}=", s[::-1], ()
    if task == "sort":
        s = "".join(chr(97 + i) for i in rng.integers(0, 8, n))
        return f"sort:{s}=", "".join(sorted(s)), ()
    if task == "add_lsd":
        return (*_add_lsd(n, rng), ())
    digits = [max(n // 2, 1), max(int(rng.integers(c.min_len, c.max_len + 1)) // 2, 1)]
    a, b = (int("".join(str(d) for d in [rng.integers(1, 10)]
                        + list(rng.integers(0, 10, k - 1)))) for k in digits)
    return f"add:{a}+{b}=", str(a + b), ()


def _add_lsd(n: int, rng: np.random.Generator) -> tuple[str, str]:
    """Two n-digit numbers and their sum, least-significant digit first (no leading zeros:
    the last digit written is nonzero)."""
    a, b = rng.integers(0, 10, (2, n))
    a[-1], b[-1] = rng.integers(1, 10, 2)
    out, carry = [], 0
    for x, y in zip(a, b):
        carry, digit = divmod(int(x + y) + carry, 10)
        out.append(digit)
    out += [carry] if carry else []
    text = lambda ds: "".join(str(int(d)) for d in ds)  # noqa: E731
    return f"add:{text(a)}+{text(b)}=", text(out)


def _held_out(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] % 10 == 0


def make_example(config: SyntheticTaskConfig, split: str, seed: int, index: int) -> Example:
    """Example `index` of `split`: deterministic in (config, split, seed, index)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of {DATASET_NAME!r}; valid: {SPLITS}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    task = config.tasks[int(rng.integers(len(config.tasks)))]
    while True:  # rejection keeps the two splits disjoint
        prompt, answer, others = _problem(task, rng, config)
        if _held_out(prompt) == (split == "validation"):
            return Example(task, [BOS] + list(prompt.encode()), list(answer.encode()),
                           tuple(tuple(o.encode()) for o in others))


def encode_row(example: Example, seq_len: int, gen_length: int) -> dict[str, np.ndarray]:
    """One batch row: prompt, the EOS-padded answer (scored), padding (segment 0)."""
    p = len(example.prompt)
    if p + gen_length > seq_len:
        raise ValueError(f"prompt of {p} tokens + gen_length={gen_length} exceeds "
                         f"seq_len={seq_len}; raise DataConfig.seq_len")
    tokens = np.full(seq_len, PAD, np.int32)
    tokens[:p] = example.prompt
    tokens[p:p + gen_length] = example.answer + [EOS] * (gen_length - len(example.answer))
    real = np.arange(seq_len) < p + gen_length
    return {"inputs": tokens, "targets": tokens.copy(), "segment_ids": real.astype(np.int32),
            "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32),
            "loss_mask": ((np.arange(seq_len) >= p) & real).astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class _Row:
    """index -> batch row (a class, not a lambda, so grain can pickle the pipeline)."""
    config: SyntheticTaskConfig
    split: str
    seed: int
    seq_len: int

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        example = make_example(self.config, self.split, self.seed, int(index))
        return encode_row(example, self.seq_len, self.config.gen_length)


def make_batches(split: str, *, seq_len: int, batch_size: int, seed: int,
                 num_examples: int | None = None,
                 config: SyntheticTaskConfig | None = None) -> grain.MapDataset:
    """Batches of `split` (train: effectively endless; num_examples caps it)."""
    config = config or SyntheticTaskConfig()
    n = num_examples if num_examples is not None else 2**31 - 1
    rows = grain.MapDataset.range(n).map(_Row(config, split, seed, seq_len))
    return rows.batch(batch_size, drop_remainder=num_examples is None)


def held_out_examples(n: int, config: SyntheticTaskConfig | None = None,
                      seed: int = 1234) -> list[Example]:
    """n validation problems (never seen in training) for evaluating decoders."""
    config = config or SyntheticTaskConfig()
    return [make_example(config, "validation", seed, i) for i in range(n)]


def accuracy_kind(tasks: tuple[str, ...]) -> str:
    """How `is_correct` scores these tasks: "valid" when any has many answers, else
    "exact match"."""
    return "valid" if any(t in MANY_ANSWERS for t in tasks) else "exact match"


def is_correct(example: Example, generated: list[int]) -> bool:
    """The generated ids up to the first EOS are a correct answer: for `permute`, valid (the
    same letters as the prompt's, each once, in any order); otherwise an exact match of the
    answer (or of another listed correct one)."""
    out = list(generated)
    if EOS in out:
        out = out[:out.index(EOS)]
    if example.task == "permute":
        letters = example.prompt[1 + len("perm:"):-1]   # BOS "perm:" s "="
        return sorted(out) == sorted(letters)
    return out == example.answer or tuple(out) in example.others
