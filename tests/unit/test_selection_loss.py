import math

import pytest
import torch
import torch.nn.functional as F

from rho1 import selective_loss
from rho1.selection import num_selected


def _batch(seed=0, b=3, t=17, v=11, ignore_frac=0.2, nan_frac=0.1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < ignore_frac] = -100
    ref = torch.rand(b, t, generator=g) * 4
    ref[torch.rand(b, t, generator=g) < nan_frac] = float("nan")
    return logits, labels, ref


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.33, 0.6, 0.9, 1.0])
def test_selects_exactly_round_ratio_of_valid_tokens(ratio):
    logits, labels, ref = _batch()
    result = selective_loss(logits, labels, ref, ratio=ratio)
    n_valid = int(((labels != -100) & ~torch.isnan(ref)).sum())
    assert result.n_valid == n_valid
    assert int(result.mask.sum()) == max(1, round(ratio * n_valid)) == num_selected(n_valid, ratio)


def test_selection_is_top_k_of_excess_loss_by_brute_force():
    logits, labels, ref = _batch(seed=1)
    result = selective_loss(logits, labels, ref, ratio=0.4)
    ce = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100, reduction="none")
    excess = (ce - ref.reshape(-1)).tolist()
    valid = [i for i in range(labels.numel()) if labels.reshape(-1)[i] != -100 and not math.isnan(ref.reshape(-1)[i])]
    k = round(0.4 * len(valid))
    expected = sorted(valid, key=lambda i: (-excess[i], i))[:k]
    assert sorted(result.mask.reshape(-1).nonzero().flatten().tolist()) == sorted(expected)
    selected_ce = ce[torch.tensor(expected)]
    assert torch.allclose(result.loss, selected_ce.mean())


def test_ignored_and_nan_reference_positions_are_never_selected_or_counted():
    logits, labels, ref = _batch(seed=2, ignore_frac=0.3, nan_frac=0.3)
    result = selective_loss(logits, labels, ref, ratio=1.0)
    assert not result.mask[labels == -100].any()
    assert not result.mask[torch.isnan(ref)].any()
    assert torch.isfinite(result.loss)
    result.loss.backward()
    grad_rows = logits.grad.abs().sum(-1)
    assert (grad_rows[(labels == -100) | torch.isnan(ref)] == 0).all()


def test_ties_break_deterministically_by_position():
    v = 5
    logits = torch.zeros(1, 10, v)  # every token has the same learner loss
    labels = torch.zeros(1, 10, dtype=torch.long)
    ref = torch.zeros(1, 10)  # and the same reference loss: all excess scores tie
    result = selective_loss(logits, labels, ref, ratio=0.3)
    assert result.mask[0].tolist() == [True] * 3 + [False] * 7
    again = selective_loss(logits, labels, ref, ratio=0.3)
    assert torch.equal(result.mask, again.mask)


def test_ratio_one_reproduces_clm_loss_and_gradients():
    logits, labels, ref = _batch(seed=3, nan_frac=0.0)
    clm_logits = logits.detach().clone().requires_grad_(True)
    clm = F.cross_entropy(clm_logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    clm.backward()
    slm = selective_loss(logits, labels, ref, ratio=1.0)
    slm.loss.backward()
    assert torch.allclose(slm.loss, clm, atol=1e-6)
    assert torch.allclose(logits.grad, clm_logits.grad, atol=1e-7)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, float("nan")])
def test_ratio_out_of_range_is_refused_with_one_sentence(ratio):
    logits, labels, ref = _batch()
    with pytest.raises(ValueError, match=r"selection ratio must be in \(0, 1\]"):
        selective_loss(logits, labels, ref, ratio=ratio)


def test_score_functions_keep_what_they_promise():
    labels = torch.zeros(1, 6, dtype=torch.long)
    # learner losses 0..5 via logits on a 2-token vocabulary
    learner = torch.arange(6, dtype=torch.float32)
    logits = torch.stack([torch.zeros(6), learner], -1).unsqueeze(0)  # CE of label 0 grows with learner
    ref = torch.tensor([[5.0, 0.0, 4.0, 1.0, 3.0, 2.0]])
    ce = F.cross_entropy(logits[0], labels[0], reduction="none")
    excess = ce - ref[0]
    by_excess = selective_loss(logits, labels, ref, ratio=0.5, score="excess").mask[0]
    assert by_excess.nonzero().flatten().tolist() == sorted(excess.topk(3).indices.tolist())
    by_ref = selective_loss(logits, labels, ref, ratio=0.5, score="reference").mask[0]
    assert by_ref.nonzero().flatten().tolist() == [1, 3, 5]  # lowest reference loss
    by_learner = selective_loss(logits, labels, ref, ratio=0.5, score="learner").mask[0]
    assert by_learner.nonzero().flatten().tolist() == [3, 4, 5]  # highest learner loss
    r1 = selective_loss(logits, labels, ref, 0.5, "random", generator=torch.Generator().manual_seed(7)).mask
    r2 = selective_loss(logits, labels, ref, 0.5, "random", generator=torch.Generator().manual_seed(7)).mask
    assert torch.equal(r1, r2) and int(r1.sum()) == 3


def test_stats_describe_selected_and_unselected_tokens():
    logits, labels, ref = _batch(seed=4, nan_frac=0.0)
    result = selective_loss(logits, labels, ref, ratio=0.5)
    s = result.stats
    assert s["frac_selected"] == pytest.approx(result.n_selected / result.n_valid)
    # the kept tokens are the ones with the higher excess loss
    assert s["excess_loss_selected"] > s["excess_loss_unselected"]
    sel = result.mask
    assert s["learner_loss_selected"] == pytest.approx(float(result.token_loss[sel].mean()), rel=1e-5)
    assert s["ref_loss_unselected"] == pytest.approx(float(ref[(labels != -100) & ~sel].mean()), rel=1e-5)


def test_unknown_score_and_missing_reference_are_refused():
    logits, labels, ref = _batch()
    with pytest.raises(ValueError, match="unknown score function"):
        selective_loss(logits, labels, ref, score="entropy")
    with pytest.raises(ValueError, match="needs reference losses"):
        selective_loss(logits, labels, None, score="excess")
