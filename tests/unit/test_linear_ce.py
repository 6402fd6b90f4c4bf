"""selective_linear_cross_entropy against the plain path: F.cross_entropy on full logits, then selection."""

import pytest
import torch

from rho1.selection import selective_linear_cross_entropy, selective_loss


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
def test_matches_plain_cross_entropy_in_loss_mask_and_gradients(dtype, tol, ratio):
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
