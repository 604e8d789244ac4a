"""Tabular (finite-response) theory of VCB, arXiv 2402.16030, Sections 3-4 and App. A.1, A.2, A.5.

A toy problem has X prompts with Y candidate responses each; a policy is an (X, Y) table of
probabilities, parameterised by softmax logits. On such tables every statement of the paper can
be checked exactly, in float64:

* Theorem 1 / Eq. 5 (:func:`optimal_policy`): if ψ_π(y|x) = -α(x)[log π(y|x) + β(x, y)] with
  α(x) > 0 and α, β independent of π, the maximiser of Eq. 3,
  J(π) = Σ_x d(x) Σ_y π(y|x) [r(x, y) + ψ_π(y|x)], is π(y|x) = softmax_y(r(x, y)/α(x) - β(x, y)).
  :func:`maximise_objective` finds the maximiser numerically for any ψ (no closed form used).
* Table 1 and Eq. 13 (:func:`psi_form`): the ψ of RRHF, SLiC, DPO and VCB, written as the paper
  writes them and as Theorem 1's (α, β); Eq. 2's KL form (:func:`maximise_kl_objective`).
* Eq. 12 / Eq. 15 (:func:`eq15_policy`, :func:`eq12_residual`): the VCB optimum
  π_sft·exp(r/(γσ_r))/Z, i.e. log-ratio gaps proportional to reward gaps.
* :func:`fit_tabular` minimises any loss of :mod:`vcb_lib.losses` over a tabular policy, to show
  what each loss converges to (VCB: Eq. 15; IPO: :func:`ipo_optimum`, log-ratios spaced by reward
  rank; DPO: no minimiser, the gaps grow without bound; SLiC/RRHF: stop at their margin/order and
  their cross-entropy term piles mass on the best response); :func:`figure1_example` reproduces
  Figure 1 with fitted policies.
* The value-aware family (:func:`check_value_aware`): VCB's ``normalize`` options
  (:func:`vcb_optimum`), InfoNCA (:func:`infonca_optimum`), NCA and A*-PO (:func:`nca_log_ratios`,
  :func:`a2po_log_ratios`: absolute log-ratios, reached when the candidates hold part of π's mass)
  against their closed forms, and which satisfy Eq. 12 exactly or up to a per-prompt scale
  (:func:`calibration_summary`).
* :func:`misalignment_rate`: App. A.5.

The ``check_*`` functions at the end are what notebook 00 runs on random problems;
:func:`run_checks` runs them all and decides pass/fail.
Separability: every ψ here acts row by row (ψ(·|x) depends only on π(·|x)), so prompts are
independent problems and stacking many random instances as rows of one table changes nothing.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vcb_lib.losses import VALUE_RELATIVES, LossType

Tensor = torch.Tensor
PsiFn = Callable[[Tensor], Tensor]  # log π (X, Y) -> ψ_π (X, Y)
DTYPE = torch.float64

FIGURE1_REWARDS = (0.1, 0.85, 0.9)  # Sec. 1 / Figure 1: y_1 bad, y_2 and y_3 almost equally good
# The order-based calibration losses (Table 1, A.12): policy losses that compare responses but
# use only the reward ORDER, i.e. ("dpo", "ipo", "slic", "rrhf").
ORDER_METHODS = tuple(lt.value for lt in LossType if lt.trains_policy and lt.pairwise and not lt.uses_reward_values)
# VCB's value-aware relatives (issue 19): ("infonca", "nca", "a2po", "odpo").
RELATIVE_METHODS = tuple(lt.value for lt in VALUE_RELATIVES)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def as_f64(x: Any) -> Tensor:
    """A detached float64 CPU tensor from a tensor, numpy array, list or scalar."""
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=DTYPE)
    return torch.tensor(np.asarray(x, dtype=np.float64), dtype=DTYPE)  # a copy: the array may be read-only (pandas)


def _table(x: Any, name: str) -> Tensor:
    """(X, Y) float64; a 1-D input is one prompt, (Y,) -> (1, Y)."""
    t = as_f64(x)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"{name} must be shaped (X, Y) (prompts, responses), got {tuple(t.shape)}")
    return t


def _per_prompt(x: Any, n_prompts: int, name: str) -> Tensor:
    """A scalar or (X,) -> (X,) float64."""
    t = as_f64(x)
    if t.dim() == 0:
        t = t.expand(n_prompts)
    if t.shape != (n_prompts,):
        raise ValueError(f"{name} must be a scalar or shaped ({n_prompts},), got {tuple(t.shape)}")
    return t


def _check_alpha(alpha: Tensor) -> None:
    if not bool(torch.isfinite(alpha).all()) or not bool((alpha > 0).all()):
        raise ValueError(
            f"Theorem 1 needs a finite alpha(x) > 0 for every prompt x; got min alpha = {alpha.min().item():g}"
            " (for SLiC/DPO/VCB alpha is γ or γ·σ_r(x): use γ > 0 and prompts whose rewards differ)"
        )


def _check_gamma(gamma: float) -> None:
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")


def _single_thread(fn: Callable) -> Callable:
    """Run ``fn`` with one intra-op torch thread, restoring the caller's setting afterwards.

    Tabular problems are a few dozen numbers: thread start-up and spinning dominate every op, and
    on a busy 2-core machine several threads made the solvers ~5x slower.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def _like(out: Tensor, ref: Any) -> Tensor:
    """Undo :func:`_table`'s promotion of a 1-D input."""
    return out[0] if as_f64(ref).dim() == 1 else out


# --------------------------------------------------------------------------------------------
# Theorem 1 (Eq. 5) and the objective of Eq. 3-4
# --------------------------------------------------------------------------------------------


def optimal_log_policy(rewards: Any, alpha: Any, beta: Any = None) -> Tensor:
    """log π_opt of Theorem 1 / Eq. 5: log_softmax_y(r(x, y)/α(x) - β(x, y)).

    ``rewards``, ``beta``: (X, Y) (or (Y,) for one prompt); ``alpha``: scalar or (X,), > 0;
    ``beta=None`` means β = 0. Raises ``ValueError`` unless every α(x) > 0.
    """
    r = _table(rewards, "rewards")
    a = _per_prompt(alpha, r.shape[0], "alpha")
    _check_alpha(a)
    b = torch.zeros_like(r) if beta is None else _table(beta, "beta")
    if b.shape != r.shape:
        raise ValueError(f"beta has shape {tuple(b.shape)} but rewards have shape {tuple(r.shape)}")
    return _like(torch.log_softmax(r / a[:, None] - b, dim=-1), rewards)


def optimal_policy(rewards: Any, alpha: Any, beta: Any = None) -> Tensor:
    """π_opt of Theorem 1 / Eq. 5: e^{r(x,y)/α(x) - β(x,y)} / Z(x), shaped like ``rewards``."""
    return optimal_log_policy(rewards, alpha, beta).exp()


def theorem1_psi(alpha: Any, beta: Any = None) -> PsiFn:
    """ψ_π(y|x) = -α(x)[log π(y|x) + β(x, y)] (Theorem 1 as restated in App. A.1)."""
    a = as_f64(alpha)
    b = None if beta is None else _table(beta, "beta")

    def psi(logps: Tensor) -> Tensor:
        aa = a if a.dim() == 0 else a[:, None]
        return -aa * (logps if b is None else logps + b)

    return psi


def prompt_weights(d: Any, n_prompts: int) -> Tensor:
    """d(x) of Eq. 3 as a distribution over prompts: ``None`` -> uniform 1/X; else (X,) > 0, normalised."""
    if d is None:
        return torch.full((n_prompts,), 1.0 / n_prompts, dtype=DTYPE)
    w = _per_prompt(d, n_prompts, "d")
    if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
        raise ValueError("d(x) must be finite and > 0 for every prompt")
    return w / w.sum()


def objective(logps: Tensor, rewards: Any, psi: PsiFn, d: Any = None) -> Tensor:
    """Eq. 3-4: J(π) = Σ_x d(x) Σ_y π(y|x) [r(x, y) + ψ_π(y|x)] for a table ``logps`` = log π (X, Y).

    ``d``: prompt weights (X,), normalised to a distribution; default uniform.
    """
    r = _table(rewards, "rewards")
    w = prompt_weights(d, r.shape[0])
    return (w * (logps.exp() * (r + psi(logps))).sum(-1)).sum()


def kl_objective(logps: Tensor, rewards: Any, ref_logps: Any, gamma: float, d: Any = None) -> Tensor:
    """Eq. 2: E_{x~d, y~π}[r(x, y)] - γ·D_KL(π || π_sft), with the KL from ``F.kl_div``."""
    r = _table(rewards, "rewards")
    ref = _table(ref_logps, "ref_logps")
    w = prompt_weights(d, r.shape[0])
    kl = F.kl_div(ref, logps, reduction="none", log_target=True).sum(-1)  # (X,): Σ_y π (log π - log π_sft)
    return (w * ((logps.exp() * r).sum(-1) - gamma * kl)).sum()


@_single_thread
def _maximise(f: Callable[[Tensor], Tensor], n_prompts: int, n_responses: int, *, max_iter: int,
              tolerance_grad: float, polish: bool) -> dict[str, Any]:
    """Maximise ``f(logps)`` over softmax tables; returns probs, logps, objective, grad_max, n_evals.

    Parameterisation: logits (X, Y) with the last column pinned to 0 (removes the softmax shift).
    1. L-BFGS with strong-Wolfe line search in float64, at most ``max_iter`` iterations. Its line
       search compares objective values, whose float64 resolution (~1e-16·|J|) stalls it at a
       max gradient of ~1e-8..1e-11 (probability errors up to ~1e-6 on stacked problems).
    2. ``polish``: Newton steps with the exact Hessian, halved until the gradient drops. The
       objective is a sum of per-prompt terms, so the Hessian is block diagonal and Y-1
       Hessian-vector products give every block. Quadratic convergence to ~1e-15.
    Stops when max |gradient| ≤ ``tolerance_grad``. ``grad_max`` is of -f in these logits.
    """
    theta = torch.zeros(n_prompts, n_responses - 1, dtype=DTYPE, requires_grad=True)
    zeros = torch.zeros(n_prompts, 1, dtype=DTYPE)
    evals = [0]

    def logps_of(t: Tensor) -> Tensor:
        return torch.log_softmax(torch.cat([t, zeros], dim=-1), dim=-1)

    def loss_of(t: Tensor) -> Tensor:
        evals[0] += 1
        return -f(logps_of(t))

    # 1. L-BFGS, strong Wolfe.
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tolerance_grad,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_of(theta)
        loss.backward()
        return loss

    opt.step(closure)

    def grad_of(t: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        t = t.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(t), t, create_graph=create_graph)
        return t, g

    # 2. Newton polish on the block-diagonal Hessian.
    t, g = grad_of(theta)
    t = t.detach()
    for _ in range(10 if polish else 0):
        if g.abs().max() <= tolerance_grad:
            break
        tt, gg = grad_of(t, create_graph=True)
        k = gg.shape[1]
        # d(Σ_x g[x, j]) / dθ[x, :] = H_x[j, :] for every prompt x at once (blocks are independent).
        hess = torch.stack([torch.autograd.grad(gg[:, j].sum(), tt, retain_graph=j < k - 1)[0] for j in range(k)], 1)
        step = torch.linalg.lstsq(hess.detach(), g[..., None]).solution[..., 0]  # (X, Y-1)
        for _halving in range(6):
            _, g_new = grad_of(t - step)
            if bool(torch.isfinite(g_new).all()) and g_new.abs().max() < g.abs().max():
                break
            step = step / 2
        else:
            break  # no step lowers the gradient: at float64's floor
        t, g = t - step, g_new

    with torch.no_grad():
        logps = logps_of(t)
        value = f(logps)
    return {"probs": logps.exp(), "logps": logps, "objective": value.item(), "grad_max": g.abs().max().item(),
            "n_evals": evals[0]}


def maximise_objective(rewards: Any, psi: PsiFn, d: Any = None, *, max_iter: int = 100,
                       tolerance_grad: float = 1e-12, polish: bool = True) -> dict[str, Any]:
    """Numerically maximise Eq. 3, J(π) = Σ_x d(x) Σ_y π(y|x)[r(x, y) + ψ_π(y|x)], over softmax tables.

    ``rewards``: (X, Y); ``psi``: callable log π (X, Y) -> ψ (X, Y), acting row by row (ψ(·|x)
    depends only on π(·|x)); ``d``: prompt weights (X,) > 0, default uniform (Theorem 1's optimum
    does not depend on them). Nothing of Theorem 1 is used: ψ is only evaluated.
    Returns ``{"probs", "logps"}`` (X, Y) float64, ``"objective"`` (J at the solution),
    ``"grad_max"`` (max |gradient| of -Σ_x d(x)/mean(d)·J_x in the logits), ``"n_evals"``.
    Solver: L-BFGS (strong Wolfe) then Newton polish, see :func:`_maximise`.
    """
    r = _table(rewards, "rewards")
    w = prompt_weights(d, r.shape[0])
    w_unit = w / w.mean()  # per-prompt weights of mean 1 keep the gradient tolerance per prompt
    out = _maximise(lambda lp: (w_unit * (lp.exp() * (r + psi(lp))).sum(-1)).sum(), *r.shape, max_iter=max_iter,
                    tolerance_grad=tolerance_grad, polish=polish)
    out["objective"] = objective(out["logps"], r, psi, w).item()
    return out


def maximise_kl_objective(rewards: Any, ref_logps: Any, gamma: float, d: Any = None, *, max_iter: int = 100,
                          tolerance_grad: float = 1e-12, polish: bool = True) -> dict[str, Any]:
    """Numerically maximise Eq. 2, E[r] - γ·D_KL(π || π_sft) (KL by ``F.kl_div``, not via ψ);
    same solver and returns as :func:`maximise_objective`."""
    _check_gamma(gamma)
    r = _table(rewards, "rewards")
    ref = _table(ref_logps, "ref_logps")
    w = prompt_weights(d, r.shape[0])
    out = _maximise(lambda lp: kl_objective(lp, r, ref, gamma, w / w.mean()) * r.shape[0], *r.shape,
                    max_iter=max_iter, tolerance_grad=tolerance_grad, polish=polish)
    out["objective"] = kl_objective(out["logps"], r, ref, gamma, w).item()
    return out


# --------------------------------------------------------------------------------------------
# Table 1 and Eq. 13: each method's ψ, in the paper's words and in Theorem 1's form
# --------------------------------------------------------------------------------------------


def reward_std(rewards: Any, mask: Any = None) -> Tensor:
    """σ_r(x) of Eq. 10: the POPULATION std (divisor n) of each prompt's valid rewards, (X, Y) -> (X,).

    (App. A.4's ``rewards.std()`` is Bessel-corrected; Eq. 10 and :func:`vcb_lib.losses.vcb_loss` use n.)
    """
    r = _table(rewards, "rewards")
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).reshape(r.shape)
    n = m.sum(-1).clamp_min(1).to(DTYPE)
    mean = torch.where(m, r, 0.0).sum(-1) / n
    return (torch.where(m, r - mean[:, None], 0.0).pow(2).sum(-1) / n).sqrt()


def scaled_rewards(rewards: Any, gamma: float, mask: Any = None) -> Tensor:
    """r(x, y)/(γσ_r(x)), (B, n): the exponent of Eq. 15 and the right side of Eq. 12.

    A prompt whose valid rewards are all equal (σ_r = 0) gets 0 everywhere: its Eq. 12 says
    "equal log-ratios", i.e. π_opt = π_sft restricted, which is also where
    :func:`vcb_lib.losses.vcb_loss` (raw reward differences, floored σ) pulls it. Invalid entries: 0.
    """
    _check_gamma(gamma)
    r = _table(rewards, "rewards")
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).reshape(r.shape)
    equal = torch.where(m, r, -math.inf).amax(-1) == torch.where(m, r, math.inf).amin(-1)  # (B,)
    sigma = reward_std(r, m).masked_fill(equal, 1.0)
    return torch.where(m & ~equal[:, None], r / (gamma * sigma[:, None]), 0.0)


@dataclass(frozen=True)
class PsiForm:
    """One method's information-content function ψ_π (Table 1 / Eq. 13) and its Theorem 1 form.

    ``psi`` is written as the paper writes it (Table 1 row ψ_π(y|x)); ``alpha`` (X,) and
    ``beta`` (X, Y) are the Theorem 1 coefficients the paper derives for it (App. A.2, Sec. 4.2),
    so that ψ = -α(x)[log π + β(x, y)] must hold identically.
    """

    method: str
    psi: PsiFn
    alpha: Tensor  # (X,)
    beta: Tensor  # (X, Y)

    def optimal_policy(self, rewards: Any) -> Tensor:
        """Theorem 1's π_opt for this ψ."""
        return optimal_policy(rewards, self.alpha, self.beta)


def rrhf_psi(rewards: Any) -> PsiForm:
    """RRHF (Table 1, A.2): ψ = -log π, i.e. α = 1, β = 0."""
    r = _table(rewards, "rewards")
    return PsiForm("rrhf", lambda lp: -lp, torch.ones(r.shape[0], dtype=DTYPE), torch.zeros_like(r))


def slic_psi(rewards: Any, gamma: float) -> PsiForm:
    """SLiC (Table 1, A.2): ψ = -γ log π, i.e. α = γ, β = 0."""
    _check_gamma(gamma)
    r = _table(rewards, "rewards")
    return PsiForm("slic", lambda lp: -gamma * lp, torch.full((r.shape[0],), float(gamma), dtype=DTYPE),
                   torch.zeros_like(r))


def dpo_psi(rewards: Any, ref_logps: Any, gamma: float) -> PsiForm:
    """DPO (Table 1, A.2): ψ = -γ[log π - log π_sft], i.e. α = γ, β = -log π_sft."""
    _check_gamma(gamma)
    r = _table(rewards, "rewards")
    ref = _table(ref_logps, "ref_logps")
    return PsiForm("dpo", lambda lp: -gamma * (lp - ref), torch.full((r.shape[0],), float(gamma), dtype=DTYPE), -ref)


def vcb_psi(rewards: Any, ref_logps: Any, gamma: float) -> PsiForm:
    """VCB (Eq. 13): ψ = -γσ_r(x)[log π - log π_sft], i.e. α = γσ_r(x), β = -log π_sft (Sec. 4.2)."""
    _check_gamma(gamma)
    r = _table(rewards, "rewards")
    ref = _table(ref_logps, "ref_logps")
    sigma = reward_std(r)
    return PsiForm("vcb", lambda lp: -gamma * sigma[:, None] * (lp - ref), gamma * sigma, -ref)


PSI_FORMS = ("rrhf", "slic", "dpo", "vcb")


def psi_form(method: str, rewards: Any, ref_logps: Any = None, gamma: float = 1.0) -> PsiForm:
    """The :class:`PsiForm` of ``method`` in ``PSI_FORMS`` (ref_logps needed for dpo and vcb)."""
    if method == "rrhf":
        return rrhf_psi(rewards)
    if method == "slic":
        return slic_psi(rewards, gamma)
    if method in ("dpo", "vcb"):
        if ref_logps is None:
            raise ValueError(f"{method}'s ψ needs ref_logps (log π_sft)")
        return (dpo_psi if method == "dpo" else vcb_psi)(rewards, ref_logps, gamma)
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(PSI_FORMS)}")


def table1_policy(method: str, rewards: Any, ref_logps: Any = None, gamma: float = 1.0) -> Tensor:
    """π_opt as the paper prints it (Table 1 row π_opt, Eq. 15), without going through (α, β)."""
    r = _table(rewards, "rewards")
    if method == "rrhf":
        out = torch.softmax(r, -1)  # e^{r} / Z
    elif method == "slic":
        out = torch.softmax(r / gamma, -1)  # e^{r/γ} / Z
    elif method == "dpo":
        w = _table(ref_logps, "ref_logps").exp() * torch.exp(r / gamma)  # π_sft e^{r/γ}
        out = w / w.sum(-1, keepdim=True)
    elif method == "vcb":
        out = eq15_policy(r, ref_logps, gamma)
    else:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(PSI_FORMS)}")
    return _like(out, rewards)


def eq15_policy(rewards: Any, ref_logps: Any, gamma: float, mask: Any = None) -> Tensor:
    """VCB's π_opt, Eq. 15: π_sft(y|x)·e^{r(x,y)/(γσ_r(x))} / Z(x), restricted to the valid responses.

    ``rewards``, ``ref_logps``: (B, n); ``mask``: (B, n) bool or None. σ_r is Eq. 10 over the valid
    responses. ``ref_logps`` need not be normalised over the n responses (sampled candidates hold
    only part of π_sft's mass): the restriction renormalises. Invalid entries get probability 0;
    a prompt with all rewards equal gets π_sft restricted (see :func:`scaled_rewards`).
    """
    _check_gamma(gamma)
    r = _table(rewards, "rewards")
    ref = _table(ref_logps, "ref_logps")
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).reshape(r.shape)
    logits = torch.where(m, ref + scaled_rewards(r, gamma, m), -math.inf)
    return _like(torch.softmax(logits, -1), rewards)


def eq12_residual(policy_logps: Any, ref_logps: Any, rewards: Any, gamma: float, mask: Any = None) -> Tensor:
    """Eq. 12 residual for every pair: (Δ_i - Δ_j) - (r_i - r_j)/(γσ_r), Δ = log π - log π_sft.

    (B, n) inputs -> (B, n, n); entries with an invalid response are 0. All zero iff VCB's
    loss is at its minimum (log-ratio gaps proportional to reward gaps).
    """
    _check_gamma(gamma)
    r = _table(rewards, "rewards")
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).reshape(r.shape)
    delta = torch.where(m, _table(policy_logps, "policy_logps") - _table(ref_logps, "ref_logps"), 0.0)
    scaled = scaled_rewards(r, gamma, m)
    res = (delta[:, :, None] - delta[:, None, :]) - (scaled[:, :, None] - scaled[:, None, :])
    return torch.where(m[:, :, None] & m[:, None, :], res, 0.0)


def ipo_optimum(rewards: Any, ref_logps: Any, gamma: float, pairs: str = "all") -> Tensor:
    """Where IPO's loss (App. A.12) converges on a tabular policy, in closed form: (B, n) probs.

    IPO minimises Σ_{(w,l)} (Δ_w - Δ_l - τ)², τ = γ⁻¹/2, over its preference pairs (r_w > r_l,
    as in :func:`vcb_lib.losses.ipo_loss`): a linear least-squares problem in the log-ratios Δ,
    solved here with ``lstsq`` (unique up to a shift per prompt, which the softmax removes).
    For ``pairs="all"`` and distinct rewards the normal equations give
    Δ_k = mean(Δ) + τ(2k - n - 1)/n, k = the reward rank: log-ratios equally spaced by RANK,
    whatever the reward VALUES (contrast Eq. 12).
    """
    _check_gamma(gamma)
    r = _table(rewards, "rewards")
    ref = _table(ref_logps, "ref_logps")
    tau = 1.0 / (2.0 * gamma)
    deltas = []
    for row in r:
        if pairs == "all":
            w, l = torch.nonzero(row[:, None] > row[None, :], as_tuple=True)
        elif pairs == "best_worst":
            w, l = row.argmax().reshape(1), row.argmin().reshape(1)
        else:
            raise ValueError(f"unknown pairs {pairs!r}; allowed: 'all', 'best_worst'")
        A = torch.zeros(len(w), len(row), dtype=DTYPE)
        A[torch.arange(len(w)), w] += 1.0
        A[torch.arange(len(w)), l] -= 1.0
        deltas.append(torch.linalg.pinv(A) @ torch.full((len(w),), tau, dtype=DTYPE) if len(w) else torch.zeros_like(row))
    return _like(torch.softmax(ref + torch.stack(deltas), -1), rewards)


# --------------------------------------------------------------------------------------------
# The value-aware family's optima in closed form (issue 19)
# --------------------------------------------------------------------------------------------


def normalized_rewards(rewards: Any, normalize: str = "prompt_std", eta: float = 1.0) -> Tensor:
    """The scaled rewards s (X, Y) whose gaps VCB's option ``normalize`` calibrates to (every
    response valid): r/σ_r(x) (Eq. 10), r/σ_B (σ_B the population std of the rewards centred on
    their prompt's mean, pooled over the whole table: the table is the loss's batch), η·r, or the
    average ranks divided by their std. A prompt whose rewards are all equal gets 0
    (:func:`scaled_rewards`)."""
    r = _table(rewards, "rewards")
    equal = (r.max(-1).values == r.min(-1).values)[:, None]  # (X, 1)
    if normalize == "prompt_std":
        s = r / reward_std(r)[:, None]
    elif normalize == "batch_std":
        centred = r - r.mean(-1, keepdim=True)
        s = r / centred.pow(2).mean().sqrt()
    elif normalize == "none":
        s = eta * r
    elif normalize == "rank":
        ranks = (r[:, None, :] < r[:, :, None]).sum(-1).to(DTYPE) + 0.5 * ((r[:, None, :] == r[:, :, None]).sum(-1) - 1)
        s = ranks / reward_std(ranks)[:, None]
    else:
        raise ValueError(f"unknown normalize {normalize!r}; allowed: 'prompt_std', 'batch_std', 'none', 'rank'")
    return torch.where(equal, 0.0, s)


def vcb_optimum(rewards: Any, ref_logps: Any, gamma: float, normalize: str = "prompt_std", eta: float = 1.0) -> Tensor:
    """Where VCB's loss, with option ``normalize``, is zero on the candidates (Eq. 12 with s in
    place of r/σ_r): π_sft·e^{s/γ}/Z, s = :func:`normalized_rewards`. prompt_std is Eq. 15."""
    _check_gamma(gamma)
    ref = _table(ref_logps, "ref_logps")
    return _like(torch.softmax(ref + normalized_rewards(rewards, normalize, eta) / gamma, -1), rewards)


def infonca_optimum(rewards: Any, ref_logps: Any, gamma: float, alpha: float) -> Tensor:
    """InfoNCA's minimiser on the candidates: softmax(γ log π/π_sft) = softmax(r/α), i.e.
    π = π_sft·e^{r/(αγ)}/Z, Theorem 1's π_opt with α(x) = αγ and β = -log π_sft (Table 1's DPO row
    with γ → αγ)."""
    _check_gamma(gamma)
    _check_gamma(alpha)
    return optimal_policy(rewards, alpha * gamma, -_table(ref_logps, "ref_logps"))


def nca_log_ratios(rewards: Any, gamma: float, alpha: float) -> Tensor:
    """NCA's minimiser when the candidates hold a small part of π's mass: each candidate's own
    log-ratio γΔ_i = log(m·softmax_i(r/α)) = r_i/α - log mean_j e^{r_j/α} (its per-candidate
    gradient w_i σ(-γΔ) - σ(γΔ)/m vanishes there). (X, Y)."""
    _check_gamma(gamma)
    _check_gamma(alpha)
    r = _table(rewards, "rewards")
    return _like((r / alpha - (torch.logsumexp(r / alpha, -1, keepdim=True) - math.log(r.shape[1]))) / gamma, rewards)


def a2po_log_ratios(rewards: Any, gamma: float, value_gamma: float) -> Tensor:
    """A*-PO's regression target, reached when the candidates hold a small part of π's mass:
    Δ_i = (r_i - V̂(x))/γ, V̂(x) = γ' log mean_j e^{r_j/γ'}: π(y_i) = π_sft(y_i)·e^{r_i/γ}/Ẑ,
    Theorem 1's π_opt (α = γ, β = -log π_sft) with the partition Z estimated by Ẑ = e^{V̂/γ}. (X, Y)."""
    _check_gamma(gamma)
    _check_gamma(value_gamma)
    r = _table(rewards, "rewards")
    value = value_gamma * (torch.logsumexp(r / value_gamma, -1, keepdim=True) - math.log(r.shape[1]))
    return _like((r - value) / gamma, rewards)


# --------------------------------------------------------------------------------------------
# What each loss converges to on a tabular policy
# --------------------------------------------------------------------------------------------


def _loss_fn(loss: LossType | str | Callable) -> tuple[str, Callable]:
    if callable(loss) and not isinstance(loss, str):
        return getattr(loss, "__name__", "custom"), loss
    lt = LossType(loss)
    return lt.value, lt.fn


@_single_thread
def fit_tabular(loss: LossType | str | Callable, rewards: Any, ref_logps: Any, *, steps: int = 150, lr: float = 0.1,
                optimizer: str = "adam", mask: Any = None, init_logits: Any = None,
                tolerance_grad: float = 1e-12, support: Any = None, polish: bool = False,
                **hparams: Any) -> dict[str, Any]:
    """Minimise a loss of :mod:`vcb_lib.losses` over a tabular policy and report where it ends.

    The policy has one free logit per candidate: policy_logps = log_softmax(θ) over the valid
    responses of each prompt, so all n responses of a prompt are the whole support (the paper's
    "restricted to the n candidates" setting). θ starts at log π_sft (training initialises π to
    π_sft) unless ``init_logits`` is given.

    Args: ``loss``: a :class:`LossType`, its name, or a function with the losses' signature;
    ``rewards``, ``ref_logps``: (B, n); ``mask``: (B, n) bool or None, the candidates the loss
    sees; ``support``: (B, n) bool, the responses the policy's softmax covers (default ``mask``):
    entries in ``support`` but not in ``mask`` hold probability the loss never sees, e.g. one
    "rest of the response space" column (where a language model keeps most of its mass), so that
    losses on absolute log-ratios (NCA, A*-PO) can reach their targets; ``steps``/``lr``: Adam steps
    and learning rate (a finite training budget), or with ``optimizer="lbfgs"`` the maximum L-BFGS
    iterations (strong Wolfe, lr 1, stops at max |grad| ≤ ``tolerance_grad``: the converged limit);
    ``polish``: then Newton steps on the exact per-prompt Hessian (see :func:`_newton_polish`),
    to float64's floor; ``**hparams``: keyword hyper-parameters of the loss (gamma, lam, delta, ...).
    The minimised quantity is the SUM of per-prompt losses (prompts are independent).

    Returns dict: ``probs``, ``logps``, ``log_ratios`` (= logps - ref_logps) as (B, n) float64
    tensors (0 / -inf outside ``support`` for probs / logps; log_ratios 0 there), ``logps_curve``
    (T+1, B, n) numpy (the policy before each Adam step / at each L-BFGS function evaluation, then
    the final one), ``loss_curve`` (T+1,) numpy (the summed loss at the same points),
    ``final_loss``, ``grad_max``, ``method``.
    """
    name, fn = _loss_fn(loss)
    r = _table(rewards, "rewards")
    ref = _table(ref_logps, "ref_logps")
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).reshape(r.shape)
    sup = m if support is None else torch.as_tensor(support, dtype=torch.bool).reshape(r.shape)
    if bool((m & ~sup).any()):
        raise ValueError("support must cover every candidate of mask (the loss reads their log-probs)")
    start = ref if init_logits is None else _table(init_logits, "init_logits")
    theta = torch.where(sup, start, 0.0).clone().requires_grad_(True)

    def policy_logps(t: Tensor) -> Tensor:  # (B, n), 0 outside the support (the losses ignore it)
        return torch.log_softmax(t.masked_fill(~sup, -math.inf), -1).masked_fill(~sup, 0.0)

    def value_of(t: Tensor) -> Tensor:
        return fn(policy_logps(t), ref, r, m, **hparams)[0].sum()

    losses_curve: list[float] = []
    logps_curve: list[np.ndarray] = []

    def total() -> Tensor:
        value = value_of(theta)
        losses_curve.append(value.item())
        logps_curve.append(policy_logps(theta).detach().numpy().copy())
        return value

    if optimizer == "adam":
        opt = torch.optim.Adam([theta], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            total().backward()
            opt.step()
    elif optimizer == "lbfgs":
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, max_eval=steps * 2, history_size=20,
                                tolerance_grad=tolerance_grad, tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            value = total()
            value.backward()
            return value

        opt.step(closure)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; allowed: 'adam', 'lbfgs'")
    if polish:
        with torch.no_grad():
            theta.copy_(_newton_polish(value_of, theta.detach(), tolerance_grad))

    theta.grad = None
    final = total()
    final.backward()
    with torch.no_grad():
        lp = policy_logps(theta)
        logps = lp.masked_fill(~sup, -math.inf)
        return {
            "method": name,
            "probs": logps.exp(),
            "logps": logps,
            "log_ratios": torch.where(sup, lp - ref, 0.0),
            "loss_curve": np.asarray(losses_curve),
            "logps_curve": np.stack(logps_curve),
            "final_loss": final.item(),
            "grad_max": theta.grad.abs().max().item(),
        }


def _newton_polish(value_of: Callable[[Tensor], Tensor], theta: Tensor, tolerance_grad: float,
                   max_steps: int = 20) -> Tensor:
    """Newton steps on θ (B, n) for a sum of per-prompt losses, returning the polished θ.

    Row b's loss depends only on θ[b], so the Hessian is block diagonal and n Hessian-vector
    products give every (n, n) block at once. The blocks are singular along the softmax shift
    (and zero outside the support): ``lstsq`` takes the minimum-norm step. A step is halved until
    the max |gradient| drops; stops at ``tolerance_grad`` or when no step lowers it (float64's floor).
    """

    def grad_of(t: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        t = t.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(value_of(t), t, create_graph=create_graph)
        return t, g

    t, g = grad_of(theta)
    t = t.detach()
    for _ in range(max_steps):
        if g.abs().max() <= tolerance_grad:
            break
        with torch.enable_grad():
            tt, gg = grad_of(t, create_graph=True)
            n = gg.shape[1]
            hess = torch.stack([torch.autograd.grad(gg[:, j].sum(), tt, retain_graph=j < n - 1)[0] for j in range(n)], 1)
        step = torch.linalg.lstsq(hess.detach(), g.detach()[..., None]).solution[..., 0]  # (B, n)
        for _halving in range(8):
            _, g_new = grad_of(t - step)
            if bool(torch.isfinite(g_new).all()) and g_new.abs().max() < g.abs().max():
                break
            step = step / 2
        else:
            break
        t, g = (t - step).detach(), g_new.detach()
    return t


def default_hparams(method: str, *, gamma: float = 1.0, lam: float = 1.0, delta: float = 1.0,
                    sft_weight: float = 1.0) -> dict[str, Any]:
    """The keyword hyper-parameters :func:`fit_tabular` passes to ``method``'s loss: those of the
    given values that :attr:`LossType.hparams` lists for it (e.g. DPO gets only ``gamma``); the
    others it lists (``reduction``, ``pairs``, ``length_penalty``) keep the loss' defaults."""
    values = {"gamma": gamma, "lam": lam, "delta": delta, "sft_weight": sft_weight}
    return {k: values[k] for k in LossType(method).hparams if k in values}


def figure1_example(rewards: Sequence[float] = FIGURE1_REWARDS, ref_probs: Sequence[float] | None = None, *,
                    gamma: float = 1.0, lam: float = 1.0, delta: float = 1.0, sft_weight: float = 1.0,
                    methods: Sequence[str] = ORDER_METHODS + ("vcb",) + RELATIVE_METHODS, steps: int = 150, lr: float = 0.1,
                    optimizer: str = "adam") -> dict[str, Any]:
    """Figure 1: one prompt, three responses with rewards (0.1, 0.85, 0.9); fitted probabilities.

    ``ref_probs``: π_sft over the responses (normalised here), default uniform. Each method's
    loss is minimised over the tabular policy with :func:`fit_tabular` (same budget for all).
    Returns ``{"probs": {"sft": ..., method: ...,"vcb_eq15": ...}, "fits": {method: fit}}`` with
    probability vectors as numpy arrays; ``vcb_eq15`` is Eq. 15's closed form for comparison.
    """
    r = as_f64(rewards)[None]  # (1, n)
    ref = torch.ones_like(r) if ref_probs is None else as_f64(ref_probs)[None]
    if ref.shape != r.shape or not bool((ref > 0).all()):
        raise ValueError(f"ref_probs must be {r.shape[1]} positive numbers, got {ref_probs!r}")
    ref_logps = (ref / ref.sum()).log()
    probs = {"sft": ref_logps.exp()[0].numpy()}
    fits = {}
    for method in methods:
        hp = default_hparams(method, gamma=gamma, lam=lam, delta=delta, sft_weight=sft_weight)
        fits[method] = fit_tabular(method, r, ref_logps, steps=steps, lr=lr, optimizer=optimizer, **hp)
        probs[method] = fits[method]["probs"][0].numpy()
    probs["vcb_eq15"] = eq15_policy(r, ref_logps, gamma)[0].numpy()
    return {"probs": probs, "fits": fits}


# --------------------------------------------------------------------------------------------
# App. A.5: misalignment rate
# --------------------------------------------------------------------------------------------


def misalignment_rate(policy_logps: Any, ref_logps: Any, rewards: Any, mask: Any = None, *,
                      per_prompt: bool = False) -> float | tuple[float, np.ndarray]:
    """Fraction of misaligned response pairs, App. A.5.

    For every unordered pair of valid responses (i, j) of the same prompt with r_i ≠ r_j, the pair
    is aligned iff the higher-reward response also has the strictly higher log-ratio
    log π/π_sft; otherwise it is misaligned. Conventions:

    * reward ties (r_i == r_j exactly) form no pair and are excluded from numerator and denominator;
    * log-ratio ties (equal log π/π_sft, e.g. π = π_sft) count as MISALIGNED (A.5 requires ">");
      so does a NaN log-ratio (e.g. -inf - -inf).

    Args: ``policy_logps``, ``ref_logps``, ``rewards``: (B, n) torch or numpy (``ref_logps=None``
    compares raw log π, i.e. the order SLiC/RRHF calibrate); ``mask``: (B, n) bool or None.
    Returns the pooled rate over all prompts' pairs (NaN if there is no pair), and with
    ``per_prompt=True`` also a (B,) numpy array of per-prompt rates (NaN for prompts without pairs).
    """
    p = _table(policy_logps, "policy_logps")
    r = _table(rewards, "rewards")
    ref = torch.zeros_like(p) if ref_logps is None else _table(ref_logps, "ref_logps")
    if not (p.shape == r.shape == ref.shape):
        raise ValueError(f"shapes differ: policy_logps {tuple(p.shape)}, ref_logps {tuple(ref.shape)}, "
                         f"rewards {tuple(r.shape)}")
    m = torch.ones_like(p, dtype=torch.bool) if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    m = m.reshape(p.shape)
    n = p.shape[1]
    ratio = torch.where(m, p - ref, 0.0)  # (B, n)
    rw = torch.where(m, r, 0.0)
    d_r = rw[:, :, None] - rw[:, None, :]  # (B, n, n)
    d_l = ratio[:, :, None] - ratio[:, None, :]
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    eligible = upper & m[:, :, None] & m[:, None, :] & (d_r != 0)
    aligned = torch.sign(d_r) * torch.sign(d_l) > 0  # NaN compares False
    mis = (eligible & ~aligned).sum((1, 2)).to(DTYPE)  # (B,)
    count = eligible.sum((1, 2)).to(DTYPE)
    pooled = (mis.sum() / count.sum()).item() if count.sum() > 0 else float("nan")
    if not per_prompt:
        return pooled
    return pooled, torch.where(count > 0, mis / count.clamp_min(1), math.nan).numpy()


# --------------------------------------------------------------------------------------------
# Random problems and the checks notebook 00 runs
# --------------------------------------------------------------------------------------------


@dataclass
class TabularProblem:
    """Random toy problems stacked as rows: ``n_instances`` × ``n_prompts`` rows, Y responses.

    rewards ~ N(0, 1); π_sft = softmax(N(0, 1)); α ~ U(0.5, 2); β ~ N(0, 1); d ~ U(0.5, 1.5).
    """

    rewards: Tensor  # (X, Y)
    ref_logps: Tensor  # (X, Y), normalised log π_sft
    alpha: Tensor  # (X,)
    beta: Tensor  # (X, Y)
    d: Tensor  # (X,)
    instance: Tensor  # (X,) long: which random instance each row belongs to


def random_problem(n_instances: int, n_prompts: int, n_responses: int, seed: int = 0) -> TabularProblem:
    """Draw ``n_instances`` random tabular problems (see :class:`TabularProblem`), seeded."""
    g = torch.Generator().manual_seed(seed)
    X, Y = n_instances * n_prompts, n_responses
    return TabularProblem(
        rewards=torch.randn(X, Y, generator=g, dtype=DTYPE),
        ref_logps=torch.log_softmax(torch.randn(X, Y, generator=g, dtype=DTYPE), -1),
        alpha=0.5 + 1.5 * torch.rand(X, generator=g, dtype=DTYPE),
        beta=torch.randn(X, Y, generator=g, dtype=DTYPE),
        d=0.5 + torch.rand(X, generator=g, dtype=DTYPE),
        instance=torch.arange(n_instances).repeat_interleave(n_prompts),
    )


def check_theorem1(problem: TabularProblem) -> dict[str, Any]:
    """Theorem 1 closed form vs the numerical maximum of Eq. 3 with ψ = -α[log π + β]."""
    closed = optimal_policy(problem.rewards, problem.alpha, problem.beta)
    num = maximise_objective(problem.rewards, theorem1_psi(problem.alpha, problem.beta), problem.d)
    return {"closed": closed.numpy(), "numeric": num["probs"].numpy(),
            "max_abs_err": (num["probs"] - closed).abs().max().item(), "grad_max": num["grad_max"]}


def check_psi_forms(problem: TabularProblem, gamma: float) -> dict[str, Any]:
    """For each method's ψ (Table 1 / Eq. 13) and for Eq. 2's KL objective, max abs differences:

    * ``<method>``: numerical maximiser of Eq. 3 with the paper's ψ vs Theorem 1 with its (α, β);
    * ``<method>_table1``: Theorem 1 with (α, β) vs the π_opt printed in Table 1 / Eq. 15;
    * ``<method>_psi_identity``: max |ψ(log π) + α[log π + β]| on random tables (ψ has Theorem 1's form);
    * ``kl_eq2_vs_dpo``: numerical maximiser of Eq. 2 vs DPO's closed form.
    """
    r, ref = problem.rewards, problem.ref_logps
    errors, policies = {}, {}
    probe = torch.log_softmax(torch.randn(r.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE), -1)
    for method in PSI_FORMS:
        form = psi_form(method, r, ref, gamma)
        closed = form.optimal_policy(r)
        num = maximise_objective(r, form.psi, problem.d)["probs"]
        errors[method] = (num - closed).abs().max().item()
        errors[f"{method}_table1"] = (closed - table1_policy(method, r, ref, gamma)).abs().max().item()
        errors[f"{method}_psi_identity"] = (form.psi(probe) + form.alpha[:, None] * (probe + form.beta)).abs().max().item()
        policies[method] = (closed.numpy(), num.numpy())
    kl = maximise_kl_objective(r, ref, gamma, problem.d)["probs"]
    errors["kl_eq2_vs_dpo"] = (kl - psi_form("dpo", r, ref, gamma).optimal_policy(r)).abs().max().item()
    return {"errors": errors, "policies": policies}


def check_vcb_fit(problem: TabularProblem, gamma: float, lam: float = 1.0, steps: int = 500) -> dict[str, Any]:
    """Minimise VCB's loss (Eq. 19-20) over tabular policies of the random problem (L-BFGS to
    convergence); compare with Eq. 15's π_opt and Eq. 12."""
    fit = fit_tabular("vcb", problem.rewards, problem.ref_logps, optimizer="lbfgs", steps=steps, gamma=gamma, lam=lam)
    eq15 = eq15_policy(problem.rewards, problem.ref_logps, gamma)
    res = eq12_residual(fit["logps"], problem.ref_logps, problem.rewards, gamma)
    return {"fit": fit, "eq15": eq15.numpy(), "max_abs_err": (fit["probs"] - eq15).abs().max().item(),
            "eq12_max_abs_err": res.abs().max().item()}


def pair_gaps(log_ratios: Any, rewards: Any, gamma: float) -> dict[str, np.ndarray]:
    """For every pair i < j of each prompt: log-ratio gap Δ_i - Δ_j and scaled reward gap
    (r_i - r_j)/(γσ_r) -- Eq. 12 says they are equal at VCB's optimum. Flat numpy arrays."""
    lr = _table(log_ratios, "log_ratios")
    r = _table(rewards, "rewards")
    s = scaled_rewards(r, gamma)
    i, j = torch.triu_indices(r.shape[1], r.shape[1], 1)
    return {"log_ratio_gap": (lr[:, i] - lr[:, j]).flatten().numpy(),
            "reward_gap": (s[:, i] - s[:, j]).flatten().numpy()}


def check_order_based(problem: TabularProblem, gamma: float, *, methods: Sequence[str] = ORDER_METHODS + ("vcb",),
                      delta: float = 1.0, sft_weight: float = 1.0, lam: float = 1.0, steps: int = 150,
                      lr: float = 0.1) -> dict[str, dict[str, Any]]:
    """Fit each loss on the random problem with the same Adam budget and summarise where it ends:

    ``misaligned_log_ratio``: A.5 rate on log π/π_sft; ``misaligned_logp``: the same on raw log π
    (the quantity SLiC and RRHF order); ``eq12_max_abs_err``: distance from VCB's proportionality;
    ``max_log_ratio_gap``: largest |Δ_i - Δ_j| (grows without bound for DPO); ``final_loss``.
    """
    out = {}
    for method in methods:
        hp = default_hparams(method, gamma=gamma, lam=lam, delta=delta, sft_weight=sft_weight)
        fit = fit_tabular(method, problem.rewards, problem.ref_logps, steps=steps, lr=lr, **hp)
        res = eq12_residual(fit["logps"], problem.ref_logps, problem.rewards, gamma)
        lr_ = fit["log_ratios"]
        out[method] = {
            "misaligned_log_ratio": misalignment_rate(fit["logps"], problem.ref_logps, problem.rewards),
            "misaligned_logp": misalignment_rate(fit["logps"], None, problem.rewards),
            "eq12_max_abs_err": res.abs().max().item(),
            "max_log_ratio_gap": (lr_.max(-1).values - lr_.min(-1).values).max().item(),
            "final_loss": fit["final_loss"],
            "fit": fit,
        }
    return out


def check_ipo_fit(problem: TabularProblem, gamma: float, steps: int = 500) -> dict[str, Any]:
    """Minimise IPO's loss (A.12) over tabular policies (L-BFGS to convergence) and compare with
    :func:`ipo_optimum`'s closed form (rank-equally-spaced log-ratios)."""
    fit = fit_tabular("ipo", problem.rewards, problem.ref_logps, optimizer="lbfgs", steps=steps, gamma=gamma)
    closed = ipo_optimum(problem.rewards, problem.ref_logps, gamma)
    return {"fit": fit, "closed": closed.numpy(), "max_abs_err": (fit["probs"] - closed).abs().max().item()}


# The value-aware family (issue 19): VCB's options and its relatives, where each one converges.
VALUE_AWARE = ("vcb", "vcb_batch_std", "vcb_none", "vcb_rank", "infonca", "nca", "a2po", "odpo")


def calibration_summary(log_ratios: Any, ref_logps: Any, rewards: Any, gamma: float) -> dict[str, float]:
    """How a policy's log-ratios Δ = log π - log π_sft (X, Y) relate to Eq. 12, pair by pair:

    * ``eq12_max_abs_err``: max |(Δ_i - Δ_j) - (r_i - r_j)/(γσ_r)| (0: Eq. 12 holds exactly);
    * ``proportional_max_abs_err``: the same after fitting the best slope c(x) per prompt,
      max |(Δ_i - Δ_j) - c(x)(r_i - r_j)/(γσ_r)| (0: log-ratio gaps proportional to reward gaps,
      i.e. value-calibrated up to a per-prompt scale);
    * ``eq12_slope``: the mean of those c(x) (1 for Eq. 12);
    * ``misaligned_log_ratio``: A.5's rate on Δ.
    """
    lr = _table(log_ratios, "log_ratios")
    s = scaled_rewards(rewards, gamma)  # (X, Y): r/(γσ_r)
    i, j = torch.triu_indices(lr.shape[1], lr.shape[1], 1)
    dl, dr = lr[:, i] - lr[:, j], s[:, i] - s[:, j]  # (X, P)
    denom = dr.pow(2).sum(-1)
    slope = torch.where(denom > 0, (dl * dr).sum(-1) / denom.clamp_min(1e-300), 0.0)  # (X,)
    return {"eq12_max_abs_err": (dl - dr).abs().max().item(),
            "proportional_max_abs_err": (dl - slope[:, None] * dr).abs().max().item(),
            "eq12_slope": slope[denom > 0].mean().item(),
            "misaligned_log_ratio": misalignment_rate(lr, torch.zeros_like(lr), rewards)}


def check_value_aware(problem: TabularProblem, gamma: float, *, alpha: float = 1.0, value_gamma: float | None = None,
                      eta: float = 1.0, offset_scale: float = 1.0, lam: float = 1.0, steps: int = 500,
                      budget_steps: int = 150, lr: float = 0.1) -> dict[str, dict[str, Any]]:
    """Where VCB's options and its relatives converge on the random problem, against their closed
    forms (``closed_form_max_abs_err``, None where there is none), and how each relates to Eq. 12
    (:func:`calibration_summary`). Losses with a minimiser are fitted to convergence (L-BFGS,
    then Newton polish):

    * VCB's ``normalize`` options (:func:`vcb_optimum`) and InfoNCA (:func:`infonca_optimum`) on the
      candidates: they read only log-ratio differences; errors are in probability;
    * NCA and A*-PO target each candidate's own log-ratio, which a policy normalised on its n
      candidates cannot reach (the targets' mass Σ π_sft e^Δ is not 1); a language model keeps
      most of its mass elsewhere. So the policy also covers one "rest" response the loss never sees,
      and the candidates hold a share c of π_sft (c = ½ over the largest mass the targets need);
      errors are in log-ratio (:func:`nca_log_ratios`, :func:`a2po_log_ratios`).
      ``a2po_uniform_sft`` is the exact-partition case on the candidates alone: π_sft uniform on
      them (the empirical distribution of n samples) and γ' = γ, where V̂ = γ log Z exactly and
      A*-PO's minimiser is Theorem 1's π_opt (α = γ, β = -log π_sft: the KL-regularised optimum);
    * ODPO has no minimiser (DPO's -log σ with an offset): fitted with the Adam budget
      (``budget_steps``, ``lr``) like the order-based losses; ``max_log_ratio_gap`` grows with it.

    ``value_gamma`` (γ') defaults to γ. Returns ``{name: summary}``, each with its ``fit``.
    """
    value_gamma = gamma if value_gamma is None else value_gamma
    r, ref = problem.rewards, problem.ref_logps
    X, Y = r.shape
    out = {}
    fit_kw = dict(optimizer="lbfgs", steps=steps, polish=True, gamma=gamma)
    # 1. Log-ratio differences only: converged on the candidates, probabilities vs the closed form.
    on_candidates = [("vcb", "vcb", dict(lam=lam), vcb_optimum(r, ref, gamma)),
                     ("vcb_batch_std", "vcb", dict(lam=lam, normalize="batch_std"), vcb_optimum(r, ref, gamma, "batch_std")),
                     ("vcb_none", "vcb", dict(lam=lam, normalize="none", eta=eta), vcb_optimum(r, ref, gamma, "none", eta)),
                     ("vcb_rank", "vcb", dict(lam=lam, normalize="rank"), vcb_optimum(r, ref, gamma, "rank")),
                     ("infonca", "infonca", dict(alpha=alpha), infonca_optimum(r, ref, gamma, alpha))]
    for name, method, hp, closed in on_candidates:
        fit = fit_tabular(method, r, ref, **fit_kw, **hp)
        out[name] = {"closed_form": "probabilities on the candidates",
                     "closed_form_max_abs_err": (fit["probs"] - closed).abs().max().item(),
                     **calibration_summary(fit["log_ratios"], ref, r, gamma), "final_loss": fit["final_loss"],
                     "grad_max": fit["grad_max"], "fit": fit}
    # 2. Absolute log-ratios: the candidates plus one unseen "rest" response.
    for name, method, hp, target in [("nca", "nca", dict(alpha=alpha), nca_log_ratios(r, gamma, alpha)),
                                     ("a2po", "a2po", dict(value_gamma=value_gamma), a2po_log_ratios(r, gamma, value_gamma))]:
        share = 0.5 / max(1.0, (ref + target).exp().sum(-1).max().item())  # c: the targets then use ≤ ½ of π
        ref_full = torch.cat([ref + math.log(share), torch.full((X, 1), math.log1p(-share), dtype=DTYPE)], 1)
        cand = torch.cat([torch.ones(X, Y, dtype=torch.bool), torch.zeros(X, 1, dtype=torch.bool)], 1)
        r_full = torch.cat([r, torch.zeros(X, 1, dtype=DTYPE)], 1)
        fit = fit_tabular(method, r_full, ref_full, mask=cand, support=torch.ones_like(cand), **fit_kw, **hp)
        log_ratios = fit["log_ratios"][:, :Y]
        out[name] = {"closed_form": "log-ratios, candidates hold a share of π_sft",
                     "closed_form_max_abs_err": (log_ratios - target).abs().max().item(), "candidate_share": share,
                     **calibration_summary(log_ratios, ref, r, gamma), "final_loss": fit["final_loss"],
                     "grad_max": fit["grad_max"], "fit": fit}
    uniform = torch.full_like(ref, -math.log(Y))
    fit = fit_tabular("a2po", r, uniform, **fit_kw, value_gamma=gamma)
    closed = optimal_policy(r, gamma, -uniform)  # Theorem 1 with α = γ, β = -log π_sft
    out["a2po_uniform_sft"] = {"closed_form": "Theorem 1's π_opt (π_sft uniform on the candidates, γ' = γ)",
                               "closed_form_max_abs_err": (fit["probs"] - closed).abs().max().item(),
                               **calibration_summary(fit["log_ratios"], uniform, r, gamma),
                               "final_loss": fit["final_loss"], "grad_max": fit["grad_max"], "fit": fit}
    # 3. ODPO: no minimiser, the Adam budget.
    fit = fit_tabular("odpo", r, ref, steps=budget_steps, lr=lr, gamma=gamma, offset_scale=offset_scale)
    lr_ = fit["log_ratios"]
    out["odpo"] = {"closed_form": None, "closed_form_max_abs_err": None, **calibration_summary(lr_, ref, r, gamma),
                   "max_log_ratio_gap": (lr_.max(-1).values - lr_.min(-1).values).max().item(),
                   "final_loss": fit["final_loss"], "grad_max": fit["grad_max"], "fit": fit}
    return out


def value_blindness(fig_a: dict[str, Any], fig_b: dict[str, Any]) -> dict[str, float]:
    """max |π_a - π_b| per method between two :func:`figure1_example` results whose rewards have
    the same order but other values (same budget). Order-based losses only see the preference
    pairs, so their fits are identical (0.0); VCB's move with the values."""
    return {m: float(np.abs(fig_a["probs"][m] - fig_b["probs"][m]).max()) for m in fig_a["fits"]}


# --------------------------------------------------------------------------------------------
# Notebook 00: every check, with its verdict
# --------------------------------------------------------------------------------------------


def hand_made_misalignment(problem: TabularProblem) -> dict[str, float]:
    """A.5's misalignment rate on inputs whose answer is known by hand (expected value in the comment)."""
    r = np.array([[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 0.0, 5.0]])
    ref = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=bool)
    mixed_policy = ref + np.array([[0.0, 0.5, 0.2, 0.0], [0.0, -1.0, -1.0, 0.0]])
    return {
        "r_ordered": misalignment_rate(ref + 0.3 * r, ref, r, mask),  # expected 0
        "reversed": misalignment_rate(ref - 0.3 * r, ref, r, mask),  # expected 1
        # prompt 1: 1 of 3 pairs misaligned; prompt 2: reward tie dropped, 1 of 2 pairs is a log-ratio tie
        "mixed": misalignment_rate(mixed_policy, ref, r, mask),  # expected 2/5
        "sft_policy": misalignment_rate(problem.ref_logps, problem.ref_logps, problem.rewards),  # all ties: 1
    }


def _verdicts(numbers: dict[str, Any]) -> dict[str, bool]:
    """Pass/fail of every check, decided from the numbers :func:`run_checks` writes (and their tolerances)."""
    tol, fit_tol = numbers["tolerance"], numbers["fit_tolerance"]
    order, blind, p = numbers["order_based"], numbers["value_blindness"], numbers["figure1"]
    mis, va = numbers["misalignment"], numbers["value_aware"]
    passed = {
        "theorem1": numbers["theorem1_max_abs_err"] <= tol,
        "psi_forms": all(err <= tol for err in numbers["psi_forms_max_abs_err"].values()),
        "vcb_tabular_vs_eq15": numbers["vcb_tabular_vs_eq15_max_abs_err"] <= fit_tol,
        "eq12": numbers["eq12_max_abs_err"] <= fit_tol,
        "ipo_tabular_vs_closed_form": numbers["ipo_tabular_vs_closed_form_max_abs_err"] <= fit_tol,
        # DPO, IPO and VCB order log π/π_sft (A.5's quantity); SLiC and RRHF order raw log π (Table 1)
        "order_respected": all(order[m]["misaligned_log_ratio"] == 0 for m in ("dpo", "ipo", "vcb"))
        and all(order[m]["misaligned_logp"] == 0 for m in ("slic", "rrhf")),
        "order_based_value_blind": all(blind[m] == 0 for m in ORDER_METHODS) and blind["vcb"] > 1e-3,
        "figure1_sums_to_one": all(abs(sum(q) - 1) < 1e-9 for q in p.values()),
        # the value-aware family: converged fits on their closed forms; who satisfies Eq. 12 (exactly, or up to a scale)
        "value_aware_closed_forms": all(v["closed_form_max_abs_err"] <= tol for v in va.values()
                                        if v["closed_form_max_abs_err"] is not None),
        "value_aware_vcb_eq12": va["vcb"]["eq12_max_abs_err"] <= tol,
        "value_aware_proportional": all(va[m]["proportional_max_abs_err"] <= tol
                                        for m in ("vcb", "vcb_batch_std", "vcb_none", "infonca", "nca", "a2po")),
        "value_aware_rank_is_not": numbers["n_responses"] < 3 or va["vcb_rank"]["proportional_max_abs_err"] > 1e-3,
        "relatives_see_values": all(blind[m] > 1e-3 for m in RELATIVE_METHODS if m in blind),
        "misalignment_hand_made": mis["r_ordered"] == 0 and mis["reversed"] == 1
        and abs(mis["mixed"] - 0.4) < 1e-12 and mis["sft_policy"] == 1,
    }
    if numbers["figure1_rewards"] == list(FIGURE1_REWARDS):  # Figure 1's qualitative claims (paper's rewards only)
        vcb, dpo = p["vcb"], p["dpo"]
        passed["figure1_vcb_y2_close_to_y3"] = vcb[1] > vcb[0] and abs(vcb[2] - vcb[1]) < abs(vcb[1] - vcb[0])
        passed["figure1_dpo_y2_close_to_y1"] = abs(dpo[1] - dpo[0]) < abs(dpo[2] - dpo[1])
    return passed


def run_checks(th: Any, seed: int) -> dict[str, Any]:
    """Everything notebook 00 checks, on random problems drawn with ``seed``, with its verdict.

    ``th``: a :class:`vcb_lib.config.TheoryConfig` (read by attribute: problem sizes, γ, λ, δ,
    sft_weight, the Adam budget ``fit_steps``/``fit_lr``, Figure 1's rewards and π_sft, and the
    tolerances ``tolerance``/``fit_tolerance``).
    Returns ``{"checks": ..., "data": ...}``:

    * ``checks``: JSON-able numbers, every error with the tolerance it is held to, ``"checks"``
      (check name -> passed) and ``"passed"`` (all of them); the caller adds its provenance.
    * ``data``: what the figures need: ``problem``, ``t1`` (:func:`check_theorem1`), ``psi``,
      ``vcb``, ``ipo``, ``order`` (with the fits), ``value_aware`` (:func:`check_value_aware`, with
      the fits), ``fig1``/``fig1_cubed`` (:func:`figure1_example` with the rewards and with the
      rewards cubed: same order, other values) and ``pair_gaps`` (:func:`pair_gaps` of the converged
      VCB, InfoNCA and VCB-rank fits and of the DPO, IPO, SLiC fits).

    The value-aware family is fitted with the losses' defaults for α (InfoNCA, NCA), η
    (normalize="none") and ODPO's offset scale (all 1), and γ' = γ for A*-PO.
    """
    problem = random_problem(th.n_instances, th.n_prompts, th.n_responses, seed=seed)
    hp = dict(delta=th.delta, sft_weight=th.sft_weight, lam=th.lam)
    # 1. Theorem 1 and the ψ of Table 1 / Eq. 13 (closed forms vs numerical maxima)
    t1 = check_theorem1(problem)
    psi = check_psi_forms(problem, th.gamma)
    # 2. The losses minimised over tabular policies: to convergence, then with the Adam budget
    vcb = check_vcb_fit(problem, th.gamma, th.lam)
    ipo = check_ipo_fit(problem, th.gamma)
    order = check_order_based(problem, th.gamma, steps=th.fit_steps, lr=th.fit_lr, **hp)
    order_summary = {m: {k: v for k, v in o.items() if k != "fit"} for m, o in order.items()}
    value_aware = check_value_aware(problem, th.gamma, lam=th.lam, budget_steps=th.fit_steps, lr=th.fit_lr)
    # 3. Figure 1, then refitted on the cubed rewards
    fig1_kwargs = dict(gamma=th.gamma, steps=th.fit_steps, lr=th.fit_lr, **hp)
    fig1 = figure1_example(th.figure1_rewards, th.figure1_ref_probs or None, **fig1_kwargs)
    fig1_cubed = figure1_example([r ** 3 for r in th.figure1_rewards], th.figure1_ref_probs or None, **fig1_kwargs)
    # 4. A.5's misalignment rate: hand-made cases and the fitted policies
    misalignment = {**hand_made_misalignment(problem),
                    **{f"fitted_{m}": o["misaligned_log_ratio"] for m, o in order_summary.items()}}

    numbers = {
        "theorem1_max_abs_err": t1["max_abs_err"],
        "psi_forms_max_abs_err": psi["errors"],
        "vcb_tabular_vs_eq15_max_abs_err": vcb["max_abs_err"],
        "eq12_max_abs_err": vcb["eq12_max_abs_err"],
        "ipo_tabular_vs_closed_form_max_abs_err": ipo["max_abs_err"],
        "order_based": order_summary,
        "value_aware": {m: {k: v for k, v in o.items() if k != "fit"} for m, o in value_aware.items()},
        "n_responses": th.n_responses,
        "value_blindness": value_blindness(fig1, fig1_cubed),
        "figure1": {m: q.tolist() for m, q in fig1["probs"].items()},
        "figure1_rewards": list(th.figure1_rewards),
        "misalignment": misalignment,
        "tolerance": th.tolerance,
        "fit_tolerance": th.fit_tolerance,
    }
    passed = _verdicts(numbers)
    fits = {"VCB (converged)": vcb["fit"], "DPO": order["dpo"]["fit"], "IPO": order["ipo"]["fit"],
            "SLiC": order["slic"]["fit"], "InfoNCA (converged)": value_aware["infonca"]["fit"],
            "VCB rank (converged)": value_aware["vcb_rank"]["fit"]}
    data = {
        "problem": problem, "t1": t1, "psi": psi, "vcb": vcb, "ipo": ipo, "order": order, "value_aware": value_aware,
        "fig1": fig1, "fig1_cubed": fig1_cubed,
        "pair_gaps": {label: pair_gaps(f["log_ratios"], problem.rewards, th.gamma) for label, f in fits.items()},
    }
    return {"checks": {**numbers, "checks": passed, "passed": all(passed.values())}, "data": data}
