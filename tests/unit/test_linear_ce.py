"""selective_linear_cross_entropy against the plain path: F.cross_entropy on full logits, then selection."""

import pytest
import torch

from rho1.selection import linear_ce, selective_linear_cross_entropy, selective_loss


def _inputs(dtype, seed=0, b=3, t=29, d=16, v=97):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g)
    proj = torch.randn(d, d, generator=g) / d**0.5  # a layer below, so the gradient reaching x is non-uniform
    weight = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.15] = -100
    ref = torch.rand(b, t, generator=g) * 5
    ref[torch.rand(b, t, generator=g) < 0.1] = float("nan")
    scale = float(torch.rand((), generator=g)) * 3 + 0.5  # a random upstream gradient on the loss
    return x, proj.to(dtype), weight, labels, ref, scale


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("ratio", [0.1, 0.35, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("kept_rows", [None, 0, 28])  # every row's softmax kept for the backward, none, 4 chunks
def test_matches_plain_cross_entropy_in_loss_mask_and_gradients(dtype, tol, ratio, kept_rows, monkeypatch):
    if kept_rows is not None:  # the rest of the selected rows have their logits recomputed in the backward
        monkeypatch.setattr(linear_ce, "KEEP_BYTES", kept_rows * 97 * 4)
    x, proj, weight, labels, ref, scale = _inputs(dtype, seed=int(ratio * 100))
    results = []
    for fused in (False, True):
        xi = x.clone().to(dtype).requires_grad_(True)
        wi = weight.clone().requires_grad_(True)
        hidden = xi @ proj
        if fused:
            out = selective_linear_cross_entropy(hidden, wi, labels, ref, ratio=ratio, chunk_size=7)
        else:
            out = selective_loss(hidden @ wi.T, labels, ref, ratio=ratio)
        (out.loss * scale).backward()
        results.append((out, xi.grad.float(), wi.grad.float()))
    (plain, gx_plain, gw_plain), (fused, gx_fused, gw_fused) = results
    assert torch.equal(plain.mask, fused.mask)
    assert fused.n_selected == plain.n_selected
    torch.testing.assert_close(fused.loss.float(), plain.loss.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx_fused, gx_plain, rtol=tol, atol=tol)
    torch.testing.assert_close(gw_fused, gw_plain, rtol=tol, atol=tol)


def test_unselected_tokens_get_no_gradient():
    x, proj, weight, labels, ref, _ = _inputs(torch.float32)
    hidden = (x @ proj).detach().requires_grad_(True)
    out = selective_linear_cross_entropy(hidden, weight, labels, ref, ratio=0.3)
    out.loss.backward()
    rows_with_grad = hidden.grad.abs().sum(-1) > 0
    assert torch.equal(rows_with_grad, out.mask)


def test_the_rows_kept_for_the_backward_fit_the_budget_in_whole_chunks(monkeypatch):
    assert linear_ce.rows_to_keep(1000, 100, budget=40_000) == 100 and linear_ce.rows_to_keep(10, 100) == 10
    kept = {}
    real = linear_ce._SelectedLinearCE.apply

    def spy(*args):
        kept["rows"] = len(args[-1])
        return real(*args)

    monkeypatch.setattr(linear_ce._SelectedLinearCE, "apply", spy)
    monkeypatch.setattr(linear_ce, "KEEP_BYTES", 30 * 97 * 4)  # 30 rows fit: 4 whole chunks of 7
    x, proj, weight, labels, ref, _ = _inputs(torch.float32)
    selective_linear_cross_entropy((x @ proj).requires_grad_(True), weight, labels, ref, ratio=0.5, chunk_size=7)
    assert kept["rows"] == 28


def test_a_reused_softmax_buffer_gives_the_same_gradients_and_a_second_backward_is_refused():
    x, proj, weight, labels, ref, _ = _inputs(torch.float32)
    grads = []
    for _ in range(3):  # the second and third steps take the buffer the first backward gave back
        hidden = (x @ proj).requires_grad_(True)
        out = selective_linear_cross_entropy(hidden, weight, labels, ref, ratio=0.5, chunk_size=7)
        out.loss.backward(retain_graph=True)
        grads.append(hidden.grad.clone())
    assert linear_ce._SPARE and all(torch.equal(g, grads[0]) for g in grads)
    with pytest.raises(RuntimeError, match="cannot be backpropagated twice"):
        out.loss.backward()
