"""The checkable tasks of the real-model speculative bench (experiments/real_tasks.py): built
deterministically from held-out standard-library files, and scored so that the reference
answer passes and a near miss fails."""
import pytest

from experiments import real_tasks
from train import corpus


@pytest.fixture(scope="module")
def tasks():
    return {kind: real_tasks.build_tasks(kind, n=6, seed=0) for kind in real_tasks.TASKS}


def test_tasks_are_deterministic_and_held_out(tasks):
    for kind, built in tasks.items():
        assert [t.prompt for t in real_tasks.build_tasks(kind, n=6, seed=0)] == [
            t.prompt for t in built]
        assert len({t.name for t in built}) == len(built)
    files = {t.name.split(":")[0] for ts in tasks.values() for t in ts}
    validation = {p.rsplit("/", 1)[-1] for p in corpus.list_stdlib_files()
                  if corpus.split_of(p) == "validation"}
    assert files <= validation


def test_the_reference_answer_scores_and_a_near_miss_does_not(tasks):
    for kind, built in tasks.items():
        answers = [t.answer + "\n\n# trailing text the model may add" for t in built]
        assert real_tasks.accuracy(built, answers) == 1.0
        wrong = [t.answer.replace(t.answer.strip()[-1], "#", 1) for t in built]
        assert real_tasks.accuracy(built, wrong) == 0.0


def test_the_edit_renames_the_function_and_nothing_else(tasks):
    for t in tasks["edit"]:
        original = t.prompt.rsplit("# Original function:\n", 1)[1].split("\n\n# The same", 1)[0]
        old = t.name.split(":")[1]
        assert t.answer.startswith(f"def {old}_new(") and t.answer != original
        assert t.answer.replace(f"{old}_new", old) == original


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        real_tasks.build_tasks("translate")
    with pytest.raises(ValueError, match="n=0"):
        real_tasks.build_tasks("edit", n=0)


def test_the_bench_keeps_prompts_of_one_bucket_and_a_budget_that_fits_every_answer():
    from decoding.generate import prompt_bucket
    from experiments.bench.real_speculative import task_prompts

    class Bytes:  # a stand-in tokenizer: one token per UTF-8 byte
        def encode(self, text):
            return list(text.encode())

    tasks, ids, budget = task_prompts(Bytes(), "next_line", n=4)
    assert len(tasks) == len(ids) == 4
    assert len({prompt_bucket(len(i)) for i in ids}) == 1
    assert all(len(i) == len(t.prompt.encode()) for t, i in zip(tasks, ids))
    assert budget > max(len(t.answer.encode()) for t in tasks)
