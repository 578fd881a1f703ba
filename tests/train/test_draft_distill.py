"""Draft distillation for a real target (train/draft_distill.py) on a tiny one: the layer-dropped
initialisation copies the target's weights, training lowers held-out KL to the target and
resumes from its checkpoint, and the saved draft (with SpecDec++'s acceptance head) decodes
through experiments.generate exactly like greedy decoding of the target."""
import numpy as np
import pytest

from tests.tolerances import F32
from train import draft_distill as dd

VOCAB = 260  # the tiny GGUF's byte-level vocabulary


def _batches(seed: int, n: int | None = None, batch: int = 4, length: int = 32):
    """Token batches of repeating motifs (structure the target's distribution follows)."""
    rng = np.random.default_rng(seed)
    i = 0
    while n is None or i < n:
        motif = rng.integers(1, VOCAB - 1, (batch, 4))
        inputs = np.tile(motif, (1, length // 4)).astype(np.int32)
        ones = np.ones((batch, length), np.int32)
        yield {"inputs": inputs, "segment_ids": ones, "loss_mask": ones,
               "positions": np.broadcast_to(np.arange(length, dtype=np.int32),
                                            (batch, length)).copy()}
        i += 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny random GGUF target (what experiments.generate loads) and a draft distilled for
    it in two chunks (10 steps, then resumed to 20), shared by the tests: one compile each."""
    from experiments.pretrained import load_pretrained
    from tests.experiments import tiny_gguf

    root = tmp_path_factory.mktemp("draft")
    gguf = tiny_gguf.write(root / "tiny.gguf", head_scale=8.0)  # peaked: KL can fall
    target = load_pretrained(gguf=gguf).model
    held_out = list(_batches(99, n=2))
    config = dd.DraftTrainConfig(keep_layers=(1,), steps=20, lr=3e-3, save_every=10)
    before = dd.evaluate(dd.draft_from_target(target, (1,)), target, held_out)
    _, first = dd.distill(target, _batches(1), config, root / "draft", max_new_steps=10)
    draft, steps = dd.distill(target, _batches(2), config, root / "draft")  # resumes at 10
    after = dd.evaluate(draft, target, held_out)
    return dict(gguf=gguf, target=target, draft=draft, workdir=root / "draft", held_out=held_out,
                steps=(first, steps), before=before, after=after)


def test_keeping_every_layer_reproduces_the_target_and_bad_layers_are_refused(tiny):
    target = tiny["target"]
    same = dd.evaluate(dd.draft_from_target(target, (0, 1)), target, tiny["held_out"])
    assert abs(same["kl"]) <= F32 and same["top1_agreement"] == 1.0
    with pytest.raises(ValueError, match="keep_layers"):
        dd.draft_from_target(target, (0, 2))
    with pytest.raises(ValueError, match="keep_layers"):
        dd.DraftTrainConfig(keep_layers=(1, 0))


def test_distillation_lowers_held_out_kl_and_resumes(tiny):
    assert tiny["steps"] == (10, 20)
    before, after = tiny["before"], tiny["after"]
    assert after["kl"] < 0.7 * before["kl"], (before, after)
    # Expected one-step acceptance (sum of min(p, q)), which a lower KL bounds via Pinsker.
    assert after["prob_acc"] > before["prob_acc"], (before, after)
    # The untouched (tied or untied) head and embedding are still the target's.
    np.testing.assert_array_equal(np.asarray(tiny["draft"].embed.table[...]),
                                  np.asarray(tiny["target"].embed.table[...]))


def test_generate_cli_decodes_with_a_draft_and_its_acceptance_head(tiny):
    from experiments.generate import decode_text
    from models.acceptance_head import DraftWithAcceptanceHead
    from train import acceptance_distill

    acceptance_distill.save_head(DraftWithAcceptanceHead.new(tiny["draft"], 1),
                                 tiny["workdir"] / "acceptance_head",
                                 acceptance_distill.HeadTrainConfig(num_layers=1))
    kwargs = dict(gguf=tiny["gguf"], max_new_tokens=12)
    greedy, _ = decode_text(None, "def f(x):", **kwargs)
    spec, stats = decode_text(None, "def f(x):", sampler="specdecpp_greedy",
                              draft_workdir=str(tiny["workdir"]), **kwargs)
    assert spec == greedy and stats["draft_calls"] > 0
