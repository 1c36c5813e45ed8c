"""GDKD, RCKA and the IB controller against hand computations and their defining properties."""
import math

import pytest
import torch
import torch.nn.functional as F

from gracevlm.train import IBController, dkd_terms, entropy_gate, gated_dkd_loss, rcka_loss, rcka_weight
from gracevlm.train.losses import gated_dkd_loss_flat, rcka_loss_batched


def _kl(p_logits, q_logits, t):
    lp, lq = F.log_softmax(p_logits / t, -1), F.log_softmax(q_logits / t, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_dkd_terms_hand_computed():
    # V = 3, target 0. Teacher probs (T=1) softmax([2, 1, 0]); student uniform.
    s = torch.zeros(1, 3)
    t = torch.tensor([[2.0, 1.0, 0.0]])
    tckd, nckd, pt = dkd_terms(s, t, torch.tensor([0]), temperature=1.0)
    e = [math.exp(2), math.exp(1), 1.0]
    z = sum(e)
    p = [x / z for x in e]
    b_t, b_s = (p[0], 1 - p[0]), (1 / 3, 2 / 3)
    want_tckd = sum(a * math.log(a / b) for a, b in zip(b_t, b_s))
    hat_t = (e[1] / (e[1] + e[2]), e[2] / (e[1] + e[2]))
    want_nckd = sum(a * math.log(a / 0.5) for a in hat_t)
    assert pt.item() == pytest.approx(p[0], rel=1e-6)
    assert tckd.item() == pytest.approx(want_tckd, rel=1e-5)
    assert nckd.item() == pytest.approx(want_nckd, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_dkd_decomposition_equals_kl(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 50, generator=g) * 3, torch.randn(64, 50, generator=g) * 3
    y = torch.randint(0, 50, (64,), generator=g)
    tckd, nckd, pt = dkd_terms(s, t, y, temperature)
    kl = _kl(t, s, temperature)
    torch.testing.assert_close(tckd + (1 - pt) * nckd, kl, rtol=1e-5, atol=1e-6)
    assert (tckd >= -1e-6).all() and (nckd >= -1e-6).all()


def test_gdkd_ungated_matches_direct_formula():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 2] = -100
    loss = gated_dkd_loss(s, t, labels, temperature=2.0, alpha=1.0, beta=1.0, gated=False)
    # rows: logits at t predict labels[t + 1]; with alpha = beta = 1 and no gates it is mean(tckd + nckd) * T^2
    rows_s, rows_t, ys = [], [], []
    for b in range(2):
        for i in range(4):
            if labels[b, i + 1] != -100:
                rows_s.append(s[b, i]), rows_t.append(t[b, i]), ys.append(labels[b, i + 1])
    tckd, nckd, _ = dkd_terms(torch.stack(rows_s), torch.stack(rows_t), torch.stack(ys), 2.0)
    assert len(ys) == 7
    assert loss.item() == pytest.approx(4.0 * (tckd + nckd).mean().item(), rel=1e-5)


def test_gdkd_gates_and_normalization():
    g = torch.Generator().manual_seed(2)
    v = 16
    s = torch.randn(6, v, generator=g)
    y = torch.randint(0, v, (6,), generator=g)
    uniform = torch.zeros(6, v)
    assert torch.allclose(entropy_gate(uniform), torch.full((6,), math.exp(-1)))
    peaked = torch.zeros(6, v)
    peaked[:, 0] = 100.0
    assert torch.allclose(entropy_gate(peaked), torch.ones(6), atol=1e-6)
    # equal gates cancel in the normalization
    gated = gated_dkd_loss_flat(s, uniform, y, 2.0, 1.0, 4.0, gated=True)
    plain = gated_dkd_loss_flat(s, uniform, y, 2.0, 1.0, 4.0, gated=False)
    assert gated.item() == pytest.approx(plain.item(), rel=1e-6)
    # unequal gates: weighted mean by hand
    t = torch.randn(6, v, generator=g) * torch.linspace(0.1, 5, 6).unsqueeze(1)
    tckd, nckd, _ = dkd_terms(s, t, y, 2.0)
    gate = entropy_gate(t)
    want = 4.0 * (gate * (tckd + 4 * nckd)).sum() / gate.sum()
    assert gated_dkd_loss_flat(s, t, y).item() == pytest.approx(want.item(), rel=1e-5)
    assert not torch.allclose(gate, gate[0].expand(6))


def test_gdkd_chunking_same_value_and_gradients():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(37, 300, generator=g, requires_grad=True)
    t = torch.randn(37, 300, generator=g)
    y = torch.randint(0, 300, (37,), generator=g)
    a = gated_dkd_loss_flat(s, t, y, chunk_size=1024)
    (ga,) = torch.autograd.grad(a, s)
    b = gated_dkd_loss_flat(s, t, y, chunk_size=5)
    (gb,) = torch.autograd.grad(b, s)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)


def test_gdkd_no_supervised_tokens_is_zero():
    s = torch.randn(1, 4, 8, requires_grad=True)
    loss = gated_dkd_loss(s, torch.randn(1, 4, 8), torch.full((1, 4), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_gdkd_zero_when_student_equals_teacher():
    z = torch.randn(1, 6, 20)
    labels = torch.randint(0, 20, (1, 6))
    assert abs(gated_dkd_loss(z, z.clone(), labels).item()) < 1e-6


def test_rcka_identity_and_invariances():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 32, generator=g)
    loss, ok = rcka_loss(x, x)
    assert ok and abs(loss.item()) < 1e-6
    y = torch.randn(12, 48, generator=g)
    base, ok = rcka_loss(x, y)
    assert ok and 0.0 < base.item() < 1.0
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    rotated, _ = rcka_loss(x, 3.7 * (y.double() @ q).float())
    assert rotated.item() == pytest.approx(base.item(), abs=1e-5)
    q2, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    rotated2, _ = rcka_loss(0.01 * (x.double() @ q2).float(), y)
    assert rotated2.item() == pytest.approx(base.item(), abs=1e-5)


def test_rcka_matches_direct_cka_formula():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 16, generator=g, dtype=torch.float64), torch.randn(9, 8, generator=g, dtype=torch.float64)
    xn, yn = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    h = torch.eye(9, dtype=torch.float64) - 1.0 / 9
    k, l_ = h @ xn @ xn.T @ h, h @ yn @ yn.T @ h
    want = 1 - (k * l_).sum() / (k.norm() * l_.norm())
    loss, ok = rcka_loss(x.float(), y.float())
    assert ok and loss.item() == pytest.approx(want.item(), abs=1e-5)


def test_rcka_degenerate_is_skipped_not_noise():
    row = torch.randn(1, 16)
    same = row.repeat(10, 1).requires_grad_(True)
    loss, ok = rcka_loss(same, torch.randn(10, 24))
    assert not ok and loss.item() == 0.0
    loss.backward()
    assert torch.equal(same.grad, torch.zeros_like(same))
    scaled_rows = (row * torch.linspace(0.5, 2.0, 10).unsqueeze(1))  # parallel rows: normalized identical
    assert not rcka_loss(torch.randn(10, 16), scaled_rows)[1]
    assert not rcka_loss(torch.randn(1, 16), torch.randn(1, 8))[1]
    # batched: the degenerate sample is excluded from the mean
    good_x, good_y = torch.randn(10, 16), torch.randn(10, 16)
    mean, valid = rcka_loss_batched(torch.stack([good_x, same.detach()]), torch.stack([good_y, good_y]))
    assert valid.tolist() == [True, False]
    assert mean.item() == pytest.approx(rcka_loss(good_x, good_y)[0].item(), abs=1e-6)


def test_rcka_weight_warmup():
    assert rcka_weight(0) == 0.0
    assert rcka_weight(200) == pytest.approx(1.5)
    assert rcka_weight(400) == 3.0 and rcka_weight(10_000) == 3.0


def test_ib_controller_ema_and_clipping():
    c = IBController(tau=3.0, eta=0.1, beta_init=0.5, beta_min=0.1, beta_max=1.0, ema_decay=0.5)
    assert c.update(5.0) == pytest.approx(0.5 + 0.1 * (5.0 - 3.0))  # first value initializes the EMA
    assert c.ema == 5.0
    # ema = 0.5 * 5 + 0.5 * 1 = 3 -> no change
    assert c.update(1.0) == pytest.approx(0.7)
    assert c.ema == pytest.approx(3.0)
    for _ in range(50):
        c.update(100.0)
    assert c.beta == 1.0  # clipped at beta_max
    for _ in range(200):
        c.update(0.0)
    assert c.beta == 0.1  # clipped at beta_min
    state = c.state_dict()
    d = IBController()
    d.load_state_dict(state)
    assert d.state_dict() == state
    assert d.update(2.0) == c.update(2.0)


def test_ib_controller_defaults():
    c = IBController()
    assert (c.tau, c.eta, c.beta, c.beta_min, c.beta_max, c.ema_decay) == (3.0, 0.003, 0.5, 0.1, 1.0, 0.99)
    c.update(3.0)
    assert c.beta == 0.5
    c.update(4.0)  # ema = 0.99 * 3 + 0.01 * 4 = 3.01
    assert c.beta == pytest.approx(0.5 + 0.003 * 0.01)
    with pytest.raises(ValueError):
        c.update(float("nan"))


def test_gdkd_finite_with_a_very_confident_teacher():
    t = torch.zeros(3, 10)
    t[:, 2] = 400.0  # p_target == 1 in fp32; lt_target - lt_rest ~ 200 would overflow exp()
    s = torch.randn(3, 10, requires_grad=True)
    loss = gated_dkd_loss_flat(s, t, torch.tensor([2, 2, 2]), temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
