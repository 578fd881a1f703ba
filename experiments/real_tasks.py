"""Tasks with checkable answers for a real pretrained model (SmolLM2-135M-Instruct), on which
speculative samplers are timed and FLy's `accuracy_retained` (arXiv 2511.22972) is defined.

  next_line  next-line completion of held-out standard-library functions: the prompt is a
             function's source up to a line inside its body plus that line's first half of
             words, the answer is the rest of the line; a completion is correct when its first
             line equals the answer exactly (trailing whitespace ignored). Only lines whose
             names all occur earlier in the function qualify (a 135M model cannot guess a new
             name). Functions come from the corpus's validation files (train/corpus.py
             split_of), so a model trained here on the training split never saw them.
  edit       a copy-heavy edit: the prompt shows a function (4-8 lines) and asks for it back
             renamed to NAME_new (recursive calls too), and starts the answer (the completion style
             suits a 135M model better than a chat instruction); correct when the
             completion's first len(answer) lines equal the renamed function. Almost every
             answer token is in the prompt, which is where prompt lookup (n-gram drafting)
             should shine.

Both are built deterministically from the Python install's own sources:

    tasks = build_tasks("edit", n=16, seed=0)           # [Task(prompt, answer, name)]
    score(task, completion) -> bool;  accuracy(tasks, completions) -> float
"""
from __future__ import annotations

import ast
import dataclasses
import random
import re

from train import corpus

TASKS = ("next_line", "edit")
MAX_FUNCTION_LINES = 24
# The edit copies the whole function back; past about ten lines a 135M model starts to
# rewrite bodies instead of copying them (0 of 4 right at 24 lines).
MAX_EDIT_LINES = 8


@dataclasses.dataclass(frozen=True)
class Task:
    """prompt: text given to the model (no special tokens); answer: the expected text;
    name: where it comes from (file:function)."""
    kind: str
    prompt: str
    answer: str
    name: str


def _functions(seed: int, limit: int, max_lines: int = MAX_FUNCTION_LINES
               ) -> list[tuple[str, str]]:
    """(name, source) of short top-level or method functions of validation-split files,
    in a seeded order; sources are dedented to column 0."""
    root = corpus.stdlib_root()
    files = [p for p in corpus.list_stdlib_files(root) if corpus.split_of(p) == "validation"
             and "/test" not in f"/{p}"]
    found: list[tuple[str, str]] = []
    for path in files:
        try:
            text = corpus.read_source(root / path)
            tree = ast.parse(text)
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            start, end = node.lineno - 1, node.end_lineno
            if (node.decorator_list or ast.get_docstring(node) is not None
                    or not 4 <= end - start <= max_lines):
                continue
            body = lines[start:end]
            indent = len(body[0]) - len(body[0].lstrip())
            if any(line.strip() and len(line) - len(line.lstrip()) < indent for line in body):
                continue
            source = "\n".join(line[indent:] for line in body)
            if "\t" in source:
                continue
            found.append((f"{path.rsplit('/', 1)[-1]}:{node.name}", source))
    random.Random(seed).shuffle(found)
    return found[:limit]


_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def _predictable(line: str, before: str) -> bool:
    """Every identifier of `line` already occurs in `before`: the line recombines names the
    prompt has shown (a 135M model cannot guess a new name; 1 of 4 arbitrary lines right)."""
    names = set(_IDENTIFIER.findall(line))
    seen = set(_IDENTIFIER.findall(before))
    return bool(names) and names <= seen


def _next_line_task(name: str, source: str, rng: random.Random) -> Task | None:
    lines = source.split("\n")
    # A body line (not the signature, not the first body line, not blank or a comment) whose
    # answer is more than a closing bracket and uses only names the prompt has shown.
    candidates = [i for i in range(2, len(lines))
                  if len(lines[i].strip()) >= 8 and not lines[i].strip().startswith("#")
                  and _predictable(lines[i], "\n".join(lines[:i]))
                  and len(lines[i].split()) >= 3]
    if not candidates:
        return None
    i = rng.choice(candidates)
    # The prompt gives the line's first half of words and stops before a space (BPE
    # vocabularies merge a space into the next word, so the answer starts at a token
    # boundary the model saw in training); the answer is the rest of the line. Whole unseen
    # lines were too hard for a 135M model (1 of 8 right).
    line = lines[i]
    indent = line[:len(line) - len(line.lstrip())]
    words = line.strip().split(" ")
    keep = (len(words) + 1) // 2
    head, rest = " ".join(words[:keep]), " " + " ".join(words[keep:])
    return Task("next_line", "\n".join(lines[:i] + [indent + head]), rest, name)


def _name_pattern(name: str) -> str:
    """The name as a whole word that is not an attribute (`x` but not `self.x`)."""
    return rf"(?<![.\w]){re.escape(name)}\b"


# One worked example ahead of the task: without it the 135M model tends to invent a new body.
_EDIT_DEMO = """# Original function:
def scale(values, factor):
    out = []
    for v in values:
        out.append(v * factor)
    return out

# The same function renamed to `scale_new`:
def scale_new(values, factor):
    out = []
    for v in values:
        out.append(v * factor)
    return out

"""


def _edit_task(name: str, source: str, rng: random.Random) -> Task | None:
    del rng
    old = name.rsplit(":", 1)[1]
    if old.startswith("__"):
        return None  # dunder methods keep their names
    new = f"{old}_new"
    edited = re.sub(_name_pattern(old), new, source)
    prompt = (_EDIT_DEMO + f"# Original function:\n{source}\n\n"
              f"# The same function renamed to `{new}`:\n")
    return Task("edit", prompt, edited, name)


def build_tasks(kind: str, n: int = 16, seed: int = 0) -> list[Task]:
    """n tasks of `kind` ("next_line" or "edit"), the same for the same seed and Python."""
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r}; valid: {TASKS}")
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    make = _next_line_task if kind == "next_line" else _edit_task
    rng = random.Random(seed)
    tasks = []
    max_lines = MAX_EDIT_LINES if kind == "edit" else MAX_FUNCTION_LINES
    for name, source in _functions(seed, limit=40 * n, max_lines=max_lines):
        task = make(name, source, rng)
        if task is not None:
            tasks.append(task)
        if len(tasks) == n:
            return tasks
    raise ValueError(f"only {len(tasks)} {kind} tasks could be built from the validation "
                     f"split; asked for n={n}")


def score(task: Task, completion: str) -> bool:
    """Whether `completion` (the generated text after the prompt) answers `task`."""
    if task.kind == "next_line":
        # The prompt ends inside a line: the completion's first line must finish it exactly.
        return completion.split("\n", 1)[0].rstrip() == task.answer.rstrip()
    want = task.answer.rstrip("\n").split("\n")
    got = completion.split("\n")[:len(want)]
    return [g.rstrip() for g in got] == [w.rstrip() for w in want]


def accuracy(tasks: list[Task], completions: list[str]) -> float:
    if len(tasks) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(tasks)} tasks")
    return sum(score(t, c) for t, c in zip(tasks, completions)) / len(tasks)


def answer_tokens(task: Task, count_tokens) -> int:
    """max_new_tokens that leaves room for the answer (count_tokens: text -> token count)."""
    return count_tokens(task.answer) + 8
