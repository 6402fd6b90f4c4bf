"""Selection rules: the registry, topk, soft (tends to topk), threshold, and a rule of one's own."""

import pytest
import torch

from rho1.cli import build_config, parser
from rho1.config import TrainConfig
from rho1.selection import RULES, get_rule, register_rule, select_top, selective_linear_cross_entropy, selective_loss


def _batch(seed=0, rows=3, cols=9, vocab=13):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows, cols), generator=g)
    labels[0, :2] = -100
    ref = torch.rand(rows, cols, generator=g) * 3
    ref[1, 3] = float("nan")
    return logits, labels, ref


def test_topk_through_the_registry_is_the_top_k_mask():
    logits, labels, ref = _batch()
    out = selective_loss(logits, labels, ref, ratio=0.4)
    valid = (labels != -100) & torch.isfinite(ref)
    n_valid = int(valid.sum())
    assert out.n_selected == round(0.4 * n_valid) == int(out.mask.sum())
    learner = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), labels.reshape(-1), reduction="none",
                                                ignore_index=-100).view_as(labels)
    expected = select_top(learner - ref, valid, round(0.4 * n_valid))
    assert torch.equal(out.mask, expected)
    assert set(out.weights.unique().tolist()) == {0.0, 1.0}
    assert out.loss.item() == pytest.approx(learner[expected].mean().item(), rel=1e-6)


def test_soft_tends_to_topk_in_weights_and_gradients():
    logits, labels, ref = _batch(1)
    topk_logits = logits.clone().requires_grad_()
    topk = selective_loss(topk_logits, labels, ref, ratio=0.5)
    topk.loss.backward()
    gaps = []
    for temperature in (1.0, 0.1, 1e-2, 1e-5):
        soft_logits = logits.clone().requires_grad_()
        soft = selective_loss(soft_logits, labels, ref, ratio=0.5, rule="soft", rule_options={"temperature": temperature})
        soft.loss.backward()
        assert torch.equal(soft.mask, topk.mask)  # the tokens weighted at least 0.5 are the top k
        gaps.append(float((soft.weights - topk.weights).abs().max()))
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.1 and gaps[-1] < 1e-4
    torch.testing.assert_close(soft.weights, topk.weights, atol=1e-4, rtol=0)
    torch.testing.assert_close(soft_logits.grad, topk_logits.grad, atol=1e-5, rtol=1e-4)
    # a larger temperature spreads the weight: every valid token gets some gradient
    warm = selective_loss(logits, labels, ref, ratio=0.5, rule="soft", rule_options={"temperature": 2.0})
    valid = (labels != -100) & torch.isfinite(ref)
    assert (warm.weights[valid] > 0).all() and (warm.weights[valid] < 1).all()


def test_soft_weights_are_finite_normalised_and_zero_where_a_token_cannot_be_selected():
    logits, labels, ref = _batch(2)
    out = selective_loss(logits, labels, ref, ratio=0.6, rule="soft", rule_options={"temperature": 0.5})
    assert torch.isfinite(out.weights).all() and out.weights.min() >= 0 and out.weights.max() <= 1
    assert (out.weights[labels == -100] == 0).all() and out.weights[1, 3] == 0
    token_loss = out.token_loss
    expected = (token_loss * out.weights).sum() / out.weights.sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.n_selected == pytest.approx(out.weights.sum().item())
    assert 0.5 < out.stats["weight_selected"] < 1 and 0 < out.stats["weight_unselected"] < 0.5  # soft, not 0/1


def test_threshold_keeps_tokens_above_it_at_most_ratio():
    logits, labels, ref = _batch(3)
    valid = (labels != -100) & torch.isfinite(ref)
    plain = selective_loss(logits, labels, ref, ratio=1.0)
    excess = plain.token_loss - ref
    for thr in (0.5, 2.0):
        out = selective_loss(logits, labels, ref, ratio=1.0, rule="threshold", rule_options={"threshold": thr})
        assert torch.equal(out.mask, valid & (excess > thr))
        assert out.stats["frac_selected"] == pytest.approx(float((valid & (excess > thr)).sum()) / float(valid.sum()))
    capped = selective_loss(logits, labels, ref, ratio=0.1, rule="threshold", rule_options={"threshold": -100.0})
    assert int(capped.mask.sum()) == round(0.1 * int(valid.sum()))
    none = selective_loss(logits.requires_grad_(), labels, ref, ratio=0.5, rule="threshold",
                          rule_options={"threshold": 1e9})
    assert none.n_selected == 0 and none.loss.item() == 0.0
    none.loss.backward()  # nothing kept: a zero loss with a zero gradient, not a NaN
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("rule", ["topk", "soft", "threshold"])
@pytest.mark.parametrize("score", ["excess", "reference", "random"])
def test_a_non_finite_learner_loss_is_never_hidden(rule, score):
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 7, 8), torch.randn(11, 8)
    hidden[1, 4] = float("nan")  # a diverged model: the run must stop (or skip the step) whatever is kept
    labels, ref = torch.randint(0, 11, (2, 7)), torch.rand(2, 7)
    options = {"threshold": -1.0}
    logits_path = selective_loss(hidden @ weight.T, labels, ref, 0.3, score, rule=rule, rule_options=options)
    chunked = selective_linear_cross_entropy(hidden, weight, labels, ref, 0.3, score, rule=rule, rule_options=options)
    assert torch.isnan(logits_path.loss_sum) and torch.isnan(chunked.loss_sum)


@pytest.mark.parametrize("rule,options", [("topk", {}), ("soft", {"temperature": 0.3}), ("threshold", {"threshold": 0.5})])
def test_global_scope_ranks_every_process_as_one(rule, options):
    from rho1.selection import select_from_token_loss

    logits, labels, ref = _batch(7, rows=4)
    whole = selective_loss(logits, labels, ref, ratio=0.4, rule=rule, rule_options=options)
    # two "processes" with two rows each; gather concatenates what every process holds, in rank order
    full = {torch.uint8: ((labels != -100) & torch.isfinite(ref)).to(torch.uint8)}
    results = []
    for rank, rows in enumerate((slice(0, 2), slice(2, 4))):
        sent = iter([full[torch.uint8], whole.token_loss.float(), ref.float()])  # valid, learner, reference
        results.append(select_from_token_loss(whole.token_loss[rows], labels[rows], ref[rows], 0.4,
                                              gather=lambda t, sent=sent: next(sent), rank=rank, rule=rule,
                                              rule_options=options))
    torch.testing.assert_close(torch.cat([r.weights for r in results]), whole.weights)
    assert sum(float(r.loss) for r in results) == pytest.approx(float(whole.loss), rel=1e-6)
    assert results[0].n_selected == pytest.approx(whole.n_selected)  # both ranks know the global sum of weights


@pytest.fixture
def bottom_rule():
    def bottom(scores, valid, ratio, **options):  # the lowest scores, with a weight outside [0, 1] and a NaN
        k = round(ratio * int(valid.sum()))
        weights = select_top(-scores, valid, k).float() * 3.0
        weights[2, 5] = float("nan")  # a valid position (the first two of row 0 are ignored labels)
        return weights

    register_rule("bottom", bottom, "the lowest scores (a test rule)")
    yield
    del RULES["bottom"]


def test_a_rule_of_ones_own_is_held_to_the_contract(bottom_rule):
    logits, labels, ref = _batch(4)
    out = selective_loss(logits, labels, ref, ratio=0.3, rule="bottom")
    top = selective_loss(logits, labels, ref, ratio=0.3)
    assert set(out.weights.unique().tolist()) <= {0.0, 1.0} and out.weights[2, 5] == 0
    assert not (out.mask & top.mask).any()
    assert parser().parse_args(["train", "--data", "x", "--rule", "bottom"]).rule == "bottom"


def test_linear_ce_path_equals_logits_path_for_every_rule():
    torch.manual_seed(5)
    hidden = torch.randn(2, 7, 8, dtype=torch.float64).float()
    weight = torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 7))
    ref = torch.rand(2, 7) * 2
    for rule, options in (("topk", {}), ("soft", {"temperature": 0.3}), ("threshold", {"threshold": 0.2})):
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        a = selective_loss(h1 @ w1.T, labels, ref, 0.5, rule=rule, rule_options=options)
        a.loss.backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        b = selective_linear_cross_entropy(h2, w2, labels, ref, 0.5, rule=rule, rule_options=options, chunk_size=5)
        b.loss.backward()
        torch.testing.assert_close(b.weights, a.weights)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)


def test_rule_options_are_checked_in_one_sentence():
    with pytest.raises(ValueError, match="--temperature must be a positive number"):
        TrainConfig(data="x", objective="slm", scores="s", rule="soft", temperature=0).check()
    with pytest.raises(ValueError, match="--threshold must be a finite number"):
        TrainConfig(data="x", objective="slm", scores="s", rule="threshold", threshold=float("nan")).check()
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--data", "x", "--rule", "nope"])
    with pytest.raises(ValueError, match="unknown selection rule 'nope'.*register_rule"):
        get_rule("nope")
    cfg = build_config(parser().parse_args(["train", "--data", "x", "--objective", "slm", "--scores", "s", "--rule",
                                            "soft", "--temperature", "0.1"]))
    assert cfg.rule == "soft" and cfg.rule_options == {"temperature": 0.1, "threshold": 0.0}
    assert list(RULES)[:3] == ["topk", "soft", "threshold"]
    sweep = build_config(parser().parse_args(["sweep", "--data", "x", "--scores", "s", "--eval-data", "h", "--rules",
                                              "topk", "threshold", "--threshold", "0.3"]))
    assert sweep.rules == ["topk", "threshold"] and sweep.train.threshold == 0.3
