"""GRACE's distillation objectives: gated decoupled KD (GDKD), relational CKA (RCKA) and the
information-bottleneck controller that adapts the GDKD weight.

Total loss of a GRACE step: ``L = L_CE + beta * L_GDKD + omega * L_RCKA`` with ``beta`` from
``IBController`` and ``omega`` warmed up linearly (see ``rcka_weight``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------------
# Gated decoupled knowledge distillation


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row decoupled KD terms for logits ``[N, V]`` and target classes ``[N]`` (no ``T^2``).

    Returns ``(tckd, nckd, p_target)``:

    * ``tckd = KL(b_T || b_S)`` on the binary distributions ``b = (p_target, 1 - p_target)``;
    * ``nckd = KL(p̂_T || p̂_S)`` on the distributions renormalized over the non-target classes;
    * ``p_target``: the teacher's (tempered) probability of the target class.

    Both use the tempered softmax ``softmax(z / T)``. Identity (DKD, Zhao et al. 2022):
    ``KL(p_T || p_S) = tckd + (1 - p_target) * nckd``.
    """
    t = float(temperature)
    ls = F.log_softmax(student_logits.to(torch.float32) / t, dim=-1)
    lt = F.log_softmax(teacher_logits.to(torch.float32) / t, dim=-1)
    idx = target.view(-1, 1)
    is_target = torch.zeros_like(ls, dtype=torch.bool).scatter_(1, idx, True)
    ls_t, lt_t = ls.gather(1, idx).squeeze(1), lt.gather(1, idx).squeeze(1)
    neg_inf = torch.tensor(float("-inf"), dtype=ls.dtype, device=ls.device)
    ls_rest = torch.logsumexp(torch.where(is_target, neg_inf, ls), dim=-1)  # log(1 - p_target), stable
    lt_rest = torch.logsumexp(torch.where(is_target, neg_inf, lt), dim=-1)
    pt_t = lt_t.exp()
    tckd = pt_t * (lt_t - ls_t) + (1.0 - pt_t) * (lt_rest - ls_rest)
    # log of the non-target distributions; the target column is masked *before* exp/subtraction so that
    # a confident teacher (lt_target - lt_rest large) cannot overflow into inf * 0 = nan in backward
    lt_hat = lt - lt_rest.unsqueeze(1)
    ls_hat = ls - ls_rest.unsqueeze(1)
    p_hat = lt_hat.masked_fill(is_target, float("-inf")).exp()
    nckd = (p_hat * (lt_hat - ls_hat).masked_fill(is_target, 0.0)).sum(-1)
    return tckd, nckd, pt_t


def entropy_gate(teacher_logits: torch.Tensor) -> torch.Tensor:
    """``g = exp(-H / log V)`` per row, ``H`` the entropy of the teacher's untempered softmax; in [1/e, 1]."""
    z = teacher_logits.detach().to(torch.float32)
    logp = F.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.exp(-entropy / math.log(z.shape[-1]))


def _weighted_dkd_sum(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, gate: torch.Tensor,
                      temperature: float, alpha: float, beta: float) -> torch.Tensor:
    tckd, nckd, _ = dkd_terms(student, teacher, target, temperature)
    return (gate * (alpha * tckd + beta * nckd)).sum()


def gated_dkd_loss_flat(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                        temperature: float = 2.0, alpha: float = 1.0, beta: float = 4.0, gated: bool = True,
                        chunk_size: int = 1024) -> torch.Tensor:
    """GDKD over already aligned rows: logits ``[N, V]``, target classes ``[N]``.

    ``T^2 * sum_i g_i (alpha * tckd_i + beta * nckd_i) / sum_i g_i`` (``g = 1`` when ``gated=False``).
    Rows are processed ``chunk_size`` at a time; with autograd each chunk is recomputed in backward
    (activation checkpointing), so peak memory is a few ``chunk_size x V`` fp32 buffers, not ``N x V``.
    """
    n = student_logits.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    teacher_logits = teacher_logits.detach()
    total = student_logits.new_zeros((), dtype=torch.float32)
    gate_sum = 0.0
    for start in range(0, n, chunk_size):
        s = student_logits[start:start + chunk_size]
        t = teacher_logits[start:start + chunk_size]
        y = target[start:start + chunk_size]
        g = entropy_gate(t) if gated else torch.ones(t.shape[0], device=t.device)
        gate_sum = gate_sum + g.sum()
        args = (s, t, y, g, float(temperature), float(alpha), float(beta))
        if torch.is_grad_enabled() and s.requires_grad:
            total = total + checkpoint(_weighted_dkd_sum, *args, use_reentrant=False)
        else:
            total = total + _weighted_dkd_sum(*args)
    return total * (temperature ** 2) / gate_sum


def gated_dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 2.0, alpha: float = 1.0, beta: float = 4.0, ignore_index: int = -100,
                   gated: bool = True, chunk_size: int = 1024) -> torch.Tensor:
    """Gated decoupled KD in the causal-LM convention.

    ``student_logits``/``teacher_logits`` ``[B, T, V]``, ``labels [B, T]``: logits at position ``t``
    predict ``labels[:, t + 1]``, which is also the DKD target class; positions whose next label is
    ``ignore_index`` are skipped. TCKD and NCKD are both scaled by ``T^2``; token ``t`` is weighted by
    ``g_t = exp(-H_t / log V)`` (``H_t``: entropy of the teacher's untempered distribution) and the sum is
    normalized by the sum of the gates. Returns a scalar (0 when no token is supervised).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    v = student_logits.shape[-1]
    s = student_logits[:, :-1].reshape(-1, v)
    t = teacher_logits[:, :-1].reshape(-1, v)
    y = labels[:, 1:].reshape(-1)
    keep = (y != ignore_index).nonzero().squeeze(1)
    return gated_dkd_loss_flat(s.index_select(0, keep), t.index_select(0, keep), y.index_select(0, keep),
                               temperature, alpha, beta, gated, chunk_size)


# ---------------------------------------------------------------------------------------------------
# Relational CKA


def _center(gram: torch.Tensor) -> torch.Tensor:
    """Double centering ``H K H`` of (a batch of) Gram matrices."""
    return gram - gram.mean(-1, keepdim=True) - gram.mean(-2, keepdim=True) + gram.mean((-2, -1), keepdim=True)


def rcka_loss_batched(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
                      rel_eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - CKA`` per sample for token sets ``[B, n, d_s]`` and ``[B, n, d_t]``.

    Tokens are L2-normalized row-wise, Gram matrices ``K = X X^T`` are double-centered and
    ``CKA = <Kc, Lc>_F / (|Kc|_F |Lc|_F)``. A sample whose centered Gram matrix is degenerate
    (``|Kc|_F <= rel_eps * |K|_F`` for student or teacher, e.g. all tokens parallel, or ``n < 2``) is
    skipped rather than turned into noise. Returns ``(mean loss over valid samples, valid [B] bool)``;
    the loss is an exact 0 (still connected to the graph) when no sample is valid.
    """
    if student_tokens.dim() != 3 or teacher_tokens.dim() != 3 or student_tokens.shape[:2] != teacher_tokens.shape[:2]:
        raise ValueError(f"expected [B, n, d] token sets with equal B and n, got {tuple(student_tokens.shape)} "
                         f"and {tuple(teacher_tokens.shape)}")
    x = F.normalize(student_tokens.to(torch.float32), dim=-1)
    y = F.normalize(teacher_tokens.detach().to(torch.float32), dim=-1)
    k, l_ = x @ x.transpose(1, 2), y @ y.transpose(1, 2)
    kc, lc = _center(k), _center(l_)
    nk, nl = kc.flatten(1).norm(dim=-1), lc.flatten(1).norm(dim=-1)
    with torch.no_grad():
        valid = (nk > rel_eps * k.flatten(1).norm(dim=-1)) & (nl > rel_eps * l_.flatten(1).norm(dim=-1))
        if student_tokens.shape[1] < 2:
            valid = torch.zeros_like(valid)
    if not bool(valid.any()):
        return student_tokens.sum() * 0.0, valid
    idx = valid.nonzero().squeeze(1)
    cka = (kc[idx] * lc[idx]).flatten(1).sum(-1) / (nk[idx] * nl[idx])
    return (1.0 - cka).mean(), valid


def rcka_loss_sets(student_sets: list[torch.Tensor], teacher_sets: list[torch.Tensor],
                   rel_eps: float = 1e-5, min_tokens: int = 4) -> tuple[torch.Tensor, float]:
    """``1 - CKA`` averaged over token sets of different sizes (one ``[n_i, d]`` pair per image, as Qwen3-VL's
    images have): sets of equal size go through ``rcka_loss_batched`` together; sets of fewer than
    ``min_tokens`` tokens are skipped (GRACE's Qwen3-VL ``rcka_loss``). Returns ``(mean loss over the valid
    sets, number of valid sets)``; an exact 0 (still connected to the graph) when none is valid."""
    if len(student_sets) != len(teacher_sets):
        raise ValueError(f"{len(student_sets)} student token sets but {len(teacher_sets)} teacher ones")
    by_size: dict[int, list[int]] = {}
    for i, (s, t) in enumerate(zip(student_sets, teacher_sets)):
        if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0]:
            raise ValueError(f"token set {i}: expected [n, d] pairs with equal n, got {tuple(s.shape)} and "
                             f"{tuple(t.shape)}")
        if s.shape[0] >= min_tokens:
            by_size.setdefault(s.shape[0], []).append(i)
    total, n_valid = None, 0
    for idx in by_size.values():
        loss, valid = rcka_loss_batched(torch.stack([student_sets[i] for i in idx]),
                                        torch.stack([teacher_sets[i] for i in idx]), rel_eps)
        k = int(valid.sum())
        if k:
            total = loss * k if total is None else total + loss * k
            n_valid += k
    if total is None:
        zero = sum(s.sum() for s in student_sets) * 0.0 if student_sets else torch.zeros(())
        return zero, 0
    return total / n_valid, float(n_valid)


def rcka_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
              rel_eps: float = 1e-5) -> tuple[torch.Tensor, bool]:
    """``1 - CKA`` of the token sets ``student_tokens [n, d_s]`` and ``teacher_tokens [n, d_t]``.

    Returns ``(loss, ok)``; ``ok`` is False (and the loss an exact 0) when a Gram matrix is degenerate.
    """
    loss, valid = rcka_loss_batched(student_tokens.unsqueeze(0), teacher_tokens.unsqueeze(0), rel_eps)
    return loss, bool(valid[0])


def rcka_weight(step: int, final: float = 3.0, warmup_steps: int = 400) -> float:
    """``omega``: linear warm-up from 0 at step 0 to ``final`` at ``warmup_steps``."""
    if warmup_steps <= 0:
        return float(final)
    return float(final) * min(1.0, step / warmup_steps)


# ---------------------------------------------------------------------------------------------------
# Information-bottleneck controller


class IBController:
    """Adapts the GDKD weight: ``ema <- d * ema + (1 - d) * value`` (the first value initializes the EMA),
    then ``beta <- clip(beta + eta * (ema - tau), beta_min, beta_max)``. ``update`` returns the new beta."""

    def __init__(self, tau: float = 3.0, eta: float = 0.003, beta_init: float = 0.5, beta_min: float = 0.1,
                 beta_max: float = 1.0, ema_decay: float = 0.99):
        if not beta_min <= beta_init <= beta_max:
            raise ValueError(f"beta_init {beta_init} is outside [beta_min, beta_max] = [{beta_min}, {beta_max}]")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.tau, self.eta = float(tau), float(eta)
        self.beta_min, self.beta_max, self.ema_decay = float(beta_min), float(beta_max), float(ema_decay)
        self.beta = float(beta_init)
        self.ema: float | None = None
        self.steps = 0

    def update(self, value: float) -> float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"IBController.update got a non-finite GDKD value {value}")
        self.ema = value if self.ema is None else self.ema_decay * self.ema + (1.0 - self.ema_decay) * value
        self.beta = min(self.beta_max, max(self.beta_min, self.beta + self.eta * (self.ema - self.tau)))
        self.steps += 1
        return self.beta

    def state_dict(self) -> dict:
        return {"tau": self.tau, "eta": self.eta, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "ema_decay": self.ema_decay, "beta": self.beta, "ema": self.ema, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for key in ("tau", "eta", "beta_min", "beta_max", "ema_decay", "beta", "ema", "steps"):
            if key not in state:
                raise KeyError(f"IBController state is missing {key!r}")
        self.tau, self.eta = float(state["tau"]), float(state["eta"])
        self.beta_min, self.beta_max = float(state["beta_min"]), float(state["beta_max"])
        self.ema_decay, self.beta = float(state["ema_decay"]), float(state["beta"])
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"IBController(beta={self.beta:.4f}, ema={self.ema}, tau={self.tau}, eta={self.eta})"
