"""The score-function registry."""

import pytest
import torch

from rho1.cli import parser
from rho1.config import TrainConfig
from rho1.selection import SCORES, get_score, register_score, selective_loss


@pytest.fixture
def ref_hard():
    register_score("ref-hard", lambda learner, reference, generator=None: reference, needs_reference=True)
    yield
    del SCORES["ref-hard"]


def test_registered_score_is_a_choice_and_needs_its_reference(ref_hard):
    assert parser().parse_args(["train", "--data", "x", "--score", "ref-hard"]).score == "ref-hard"
    TrainConfig(data="x", objective="slm", score="ref-hard", scores="s").check()
    with pytest.raises(ValueError, match="needs reference losses"):
        TrainConfig(data="x", objective="slm", score="ref-hard").check()
    logits, labels, ref = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5)), torch.rand(2, 5)
    out = selective_loss(logits, labels, ref, ratio=0.4, score="ref-hard")
    assert out.mask.sum() == 4 and set(ref[out.mask].tolist()) == set(ref.flatten().topk(4).values.tolist())
    with pytest.raises(ValueError, match="needs reference losses"):
        selective_loss(logits, labels, None, ratio=0.4, score="ref-hard")


def test_built_in_scores_and_bad_names():
    assert list(SCORES)[:5] == ["excess", "retrospective", "reference", "learner", "random"]
    import torch

    learner, reference = torch.tensor([2.0, 1.0]), torch.tensor([1.5, 3.0])  # ssToken's REL: what was learned since
    assert get_score("retrospective").fn(learner, reference).tolist() == [-0.5, 2.0]
    assert [get_score(n).needs_reference for n in ("excess", "reference", "learner", "random")] == [True, True,
                                                                                                   False, False]
    with pytest.raises(ValueError, match="unknown score function 'nope'.*register_score"):
        get_score("nope")
    with pytest.raises(ValueError, match="letters, digits"):
        register_score("no spaces", lambda learner, reference, generator=None: learner)
