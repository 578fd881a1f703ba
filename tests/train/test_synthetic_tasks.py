"""The synthetic tasks with several correct answers (train/synthetic_tasks.py): `alternate`
(the diffusion bench's dependent task) and `permute`, scored by validity; held out like the
others. Pure Python: no model, no compilation."""
import numpy as np
import pytest

from train import synthetic_tasks as st

ALTERNATE = st.SyntheticTaskConfig(tasks=("alternate",), min_len=32, max_len=32, gen_length=48)
PERMUTE = st.SyntheticTaskConfig(tasks=("permute",), min_len=32, max_len=32, gen_length=48)


def test_alternate_has_two_answers_and_rejects_equal_neighbours():
    held = st.held_out_examples(40, ALTERNATE)
    firsts = set()
    for e in held:
        text = bytes(e.prompt[1:]).decode()
        assert text.startswith("alt:") and text.endswith("=") and len(text) == 7
        x, y = text[4], text[5]
        assert x != y and {x, y} <= set(st.LETTERS)
        answers = {bytes(e.answer).decode(), bytes(e.others[0]).decode()}
        assert answers == {(x + y) * 16, (y + x) * 16}
        firsts.add(e.answer[0] == ord(x))
        for answer in (e.answer, list(e.others[0])):
            assert st.is_correct(e, answer + [st.EOS] * 16)
        good = list(e.answer)
        assert not st.is_correct(e, good[:5] + good[4:5] + good[6:] + [st.EOS])  # xx
        assert not st.is_correct(e, good[:16] + list(e.others[0][16:]))          # two halves
        assert not st.is_correct(e, good[:-1] + [st.EOS])                       # too short
        assert not st.is_correct(e, good + good[-2:-1] + [st.EOS])              # too long
    assert firsts == {True, False}   # both answers are drawn
    train = {tuple(st.make_example(ALTERNATE, "train", 0, i).prompt) for i in range(300)}
    assert not train & {tuple(e.prompt) for e in held}
    assert st.accuracy_kind(("alternate",)) == "valid"


def _letters(e: st.Example) -> list[int]:
    text = bytes(e.prompt[1:]).decode()
    assert text.startswith("perm:") and text.endswith("=")
    return list(text[5:-1].encode())


def test_permute_prompts_are_distinct_letters_and_answers_their_permutations():
    held = st.held_out_examples(20, PERMUTE)
    for e in held:
        s = _letters(e)
        assert len(s) == 32 == len(set(s)) == len(e.answer)
        assert set(bytes(s).decode()) <= set(st.PERMUTE_ALPHABET)
        assert sorted(e.answer) == sorted(s) and not e.others
    # The answer is a random permutation, not the prompt's order (which would be `copy`).
    assert sum(e.answer == _letters(e) for e in held) == 0
    train = {tuple(st.make_example(PERMUTE, "train", 0, i).prompt) for i in range(200)}
    assert not train & {tuple(e.prompt) for e in held}
    # Examples are a pure function of (seed, split, index): the iterator resumes exactly.
    again = st.make_example(PERMUTE, "train", 3, 17)
    assert again == st.make_example(PERMUTE, "train", 3, 17)
    row = st.encode_row(again, 96, 48)
    assert row["loss_mask"].sum() == 48 and np.all(row["inputs"][len(again.prompt) + 32:
                                                                len(again.prompt) + 48] == st.EOS)


def test_permute_is_scored_by_validity_not_exact_match():
    e = st.held_out_examples(1, PERMUTE)[0]
    s = _letters(e)
    rng = np.random.default_rng(0)
    other = list(rng.permutation(s))
    assert other != e.answer
    assert st.is_correct(e, e.answer + [st.EOS] * 16)
    assert st.is_correct(e, other + [st.EOS] * 16)            # any order is correct
    assert st.is_correct(e, sorted(s))                         # no EOS: the whole output
    dup = other[:-1] + other[:1]                               # one letter twice, one missing
    assert not st.is_correct(e, dup + [st.EOS])
    outside = ord("G")                                         # not a letter of the task
    assert outside not in s
    assert not st.is_correct(e, other[:-1] + [outside, st.EOS])
    assert not st.is_correct(e, other[:-1] + [st.EOS])         # too short
    assert not st.is_correct(e, other + other[:1] + [st.EOS])  # too long
    assert not st.is_correct(e, other[:16] + [st.EOS] + other[16:])   # cut by an early EOS
    assert st.accuracy_kind(("permute",)) == "valid"
    assert st.accuracy_kind(("copy", "shift")) == "exact match"
    assert st.accuracy_kind(("copy", "permute")) == "valid"


def test_permute_needs_enough_distinct_letters():
    n = len(st.PERMUTE_ALPHABET)
    st.SyntheticTaskConfig(tasks=("permute",), min_len=n, max_len=n, gen_length=n)
    # Fewer letters than the alphabet: distinct letters drawn from it.
    short = st.SyntheticTaskConfig(tasks=("permute",), min_len=8, max_len=12, gen_length=16)
    for e in st.held_out_examples(5, short):
        s = _letters(e)
        assert 8 <= len(s) == len(set(s)) <= 12 and st.is_correct(e, sorted(s))
    with pytest.raises(ValueError, match=f"max_len={n + 1}.*<= {n}"):
        st.SyntheticTaskConfig(tasks=("permute",), min_len=n, max_len=n + 1, gen_length=64)
