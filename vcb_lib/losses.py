"""Alignment losses on listwise sequence log-probs: VCB (arXiv 2402.16030), its baselines and its
value-aware relatives.

Every loss is a pure function with the same leading signature, so a trainer calls any of them
through :class:`LossType` without branching on names::

    losses, metrics = fn(policy_logps, ref_logps, rewards, mask, *, <hyper-parameters>, n_tokens=None)

Inputs are shaped ``(B, n)``: ``B`` prompts with ``n`` sampled candidate responses each.

* ``policy_logps`` -- summed token log-probs ``log π(y_i|x)`` of each response under the policy.
* ``ref_logps`` -- the same under the frozen SFT/reference model ``π_sft`` (``None`` allowed for
  losses that do not use it: SLiC, RRHF, ReST, SFT).
* ``rewards`` -- reward-model values ``r(x, y_i)`` (constants of the loss).
* ``mask`` -- bool, True where a response is real; ``None`` means all valid. Padded entries may
  hold anything (even inf/NaN): they are replaced by finite values before any arithmetic, so they
  change no loss and receive an exact zero gradient.
* ``n_tokens`` -- response token counts, used for per-token NLL and RRHF length normalisation.

Each returns ``(losses, metrics)``: per-prompt losses ``(B,)`` (the caller reduces, e.g.
``.mean()``) and a dict of detached 0-dim diagnostics named as in the DPO reference code / TRL
(``rewards/chosen``, ``rewards/margins``, ``logps/chosen``, ...). "Implied rewards" are the
quantities each loss treats as a reward (Table 1): ``γ·log π/π_sft`` for VCB/DPO/IPO and the
relatives, ``γ·log π`` for SLiC, the length-normalised log-prob for RRHF.

Order-based losses (DPO, IPO, SLiC, RRHF, and ODPO, which adds a value-based offset) turn the
rewards of the ``n`` candidates into preference pairs ``(w, l)`` with ``r_w > r_l`` (ties never
form a pair), Sec. 5.3:
``pairs="all"`` uses every such ordered pair, ``pairs="best_worst"`` only argmax vs argmin
reward (first index on ties; no pair when all rewards are equal).

Value-aware losses read the reward values themselves: VCB (whose design choices -- Eq. 10's
per-prompt std, the logsumexp of Eq. 20 -- are options of :func:`vcb_loss`), InfoNCA and NCA
(softmax(r/α) targets over all n candidates), A*-PO's pointwise regression onto r - V̂(x), and
ODPO's offset α·log(r_w - r_l). ``LossType.uses_reward_values`` says which.

CUT (:func:`cut_loss`, arXiv 2312.14591) learns from natural-language judgments instead of reward
values (``vcb_lib.judgments`` writes them from the task's white-box features). It is token level:
its ``policy_logps`` are per-token log-probs ``(B, n, T)`` and it also takes the negative candidates'
token log-probs in their judgment's context (``judged_logps``) and which candidates are negative;
``LossType.token_level`` / ``LossType.judged`` tell a trainer to build those.
"""
from __future__ import annotations

import functools
import math
import numbers
from enum import StrEnum
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Metrics = dict[str, Tensor]

REDUCTIONS = ("logsumexp", "mean", "max")
NORMALIZES = ("prompt_std", "batch_std", "none", "rank")
SIGMA_POLICIES = ("floor", "drop")
PAIRS = ("all", "best_worst")
SELECTS = ("best", "all")


# --------------------------------------------------------------------------------------------
# Validation and shared helpers
# --------------------------------------------------------------------------------------------


def _check_positive(fn: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")


def _check_nonnegative(fn: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value!r}")


def _check_choice(fn: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{fn}: unknown {name} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _prepare(
    fn: str,
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    rewards: Tensor | None,
    mask: Tensor | None,
    n_tokens: Tensor | None,
    *,
    need_ref: bool,
    need_rewards: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor | None]:
    """Check shapes once and return the inputs with padded entries made finite.

    ``masked_fill`` (not multiplication) is used so that a NaN/inf in a padded slot neither leaks
    into the values nor into the gradient (its backward writes exact zeros there).
    Returns ``(policy, ref, rewards, mask, n_tokens)``; all float tensors in ``policy``'s dtype.
    """
    if not isinstance(policy_logps, Tensor) or policy_logps.dim() != 2 or not policy_logps.is_floating_point():
        got = tuple(policy_logps.shape) if isinstance(policy_logps, Tensor) else type(policy_logps).__name__
        raise ValueError(f"{fn}: policy_logps must be a floating (B, n) tensor, got {got}")
    shape = policy_logps.shape
    if need_ref and ref_logps is None:
        raise ValueError(f"{fn}: ref_logps is required (this loss uses log π/π_sft)")
    if need_rewards and rewards is None:
        raise ValueError(f"{fn}: rewards are required")
    for name, t in (("ref_logps", ref_logps), ("rewards", rewards), ("mask", mask), ("n_tokens", n_tokens)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{fn}: {name} has shape {got} but policy_logps has shape {tuple(shape)}; "
                "all (B, n) inputs must match"
            )
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=policy_logps.device)
    elif mask.dtype != torch.bool:
        raise ValueError(f"{fn}: mask must be a bool tensor, got dtype {mask.dtype}")
    pad = ~mask
    dtype = policy_logps.dtype
    policy = policy_logps.masked_fill(pad, 0.0)
    ref = None if ref_logps is None else ref_logps.to(dtype).masked_fill(pad, 0.0)
    rw = None if rewards is None else rewards.to(dtype).masked_fill(pad, 0.0)
    nt = None if n_tokens is None else n_tokens.to(dtype).masked_fill(pad, 1.0)
    return policy, ref, rw, mask, nt


def _pair_mask(rewards: Tensor | None, mask: Tensor, pairs: str) -> Tensor:
    """(B, n) -> (B, n, n) bool; entry [b, w, l] is True iff (w, l) is a pair of prompt b.

    ``"all"``: both valid and r_w > r_l. ``"best_worst"``: the single pair (argmax r, argmin r)
    over valid responses, if r_max > r_min. ``"upper"`` (VCB only, rewards unused): both valid
    and w < l, i.e. each unordered pair once.
    """
    B, n = mask.shape
    valid = mask[:, :, None] & mask[:, None, :]  # (B, n, n)
    if pairs == "upper":
        return valid & torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    better = rewards[:, :, None] > rewards[:, None, :]  # (B, n, n)
    if pairs == "all":
        return valid & better
    best = rewards.masked_fill(~mask, -math.inf).argmax(-1)  # (B,), first index on ties
    worst = rewards.masked_fill(~mask, math.inf).argmin(-1)  # (B,)
    chosen = F.one_hot(best, n).bool()[:, :, None] & F.one_hot(worst, n).bool()[:, None, :]
    return valid & better & chosen


def _prompt_var(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, n) -> the POPULATION variance of each prompt's valid values (B,) (divisor m, Eq. 10
    squared; 0 for a prompt without any) and the values minus their prompt's mean (B, n), 0 where padded."""
    mf = mask.sum(-1).clamp_min(1).to(values.dtype)
    mean = torch.where(mask, values, 0.0).sum(-1) / mf  # (B,)
    centred = torch.where(mask, values - mean[:, None], 0.0)  # (B, n)
    return centred.pow(2).sum(-1) / mf, centred


def _centred_ranks(values: Tensor, mask: Tensor) -> Tensor:
    """(B, n) -> (B, n): each valid value's rank among its prompt's valid values (0-based, ties share
    their mean rank) minus the mean rank (m-1)/2; 0 where padded."""
    other = mask[:, None, :]  # (B, 1, n): j valid
    below = ((values[:, None, :] < values[:, :, None]) & other).sum(-1)  # (B, n): #{j: v_j < v_i}
    ties = ((values[:, None, :] == values[:, :, None]) & other).sum(-1)  # (B, n): #{j: v_j = v_i}, i included
    rank = below.to(values.dtype) + 0.5 * (ties.to(values.dtype) - 1)
    return torch.where(mask, rank - 0.5 * (mask.sum(-1, keepdim=True).to(values.dtype) - 1), 0.0)


def _masked_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """(B, n) -> (B, n): softmax over each row's valid entries; 0 where padded and in rows without any."""
    x = x.masked_fill(~mask, -math.inf).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return torch.softmax(x, -1).masked_fill(~mask, 0.0)


def _masked_log_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """(B, n) -> (B, n): log_softmax over each row's valid entries; 0 where padded (exact zero gradient there)."""
    x = x.masked_fill(~mask, -math.inf).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return torch.log_softmax(x, -1).masked_fill(~mask, 0.0)


def _pair_mean(pair_losses: Tensor, pm: Tensor) -> Tensor:
    """(B, n, n) pair losses -> (B,) mean over each prompt's pairs; 0 for a prompt with none."""
    return torch.where(pm, pair_losses, 0.0).sum((1, 2)) / pm.sum((1, 2)).clamp_min(1)


def _select_top(rewards: Tensor, mask: Tensor, top_k: int) -> Tensor:
    """(B, n) -> (B, n) bool: the ``top_k`` highest-reward valid responses (stable: first index wins ties)."""
    B, n = rewards.shape
    order = torch.sort(rewards.masked_fill(~mask, -math.inf), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand(B, n))
    return mask & (rank < top_k)


def _nll(policy: Tensor, selected: Tensor, n_tokens: Tensor | None) -> Tensor:
    """(B, n) -> (B,): NLL of the selected responses; per token (Σ -logp / Σ tokens) when
    ``n_tokens`` is given, else per sequence (mean -logp over selected). 0 if none selected."""
    nll = -torch.where(selected, policy, 0.0).sum(-1)
    if n_tokens is None:
        return nll / selected.sum(-1).clamp_min(1)
    return nll / torch.where(selected, n_tokens, 0.0).sum(-1).clamp_min(1)


@torch.no_grad()
def _pair_metrics(implied: Tensor, policy: Tensor, pm: Tensor) -> Metrics:
    """Detached DPO-style diagnostics averaged over all pairs (w, l) of the batch.

    ``rewards/accuracies`` is the fraction of pairs whose implied reward is ordered like the
    reward model (1 - the misalignment rate of App. A.5 for VCB/DPO/IPO).
    """
    count = pm.sum().clamp_min(1)

    def over_pairs(x: Tensor) -> Tensor:  # (B, n, n) -> ()
        return torch.where(pm, x, 0.0).sum() / count

    chosen, rejected = implied[:, :, None], implied[:, None, :]  # (B, n, 1), (B, 1, n)
    margins = chosen - rejected  # (B, n, n)
    return {
        "rewards/chosen": over_pairs(chosen.expand_as(margins)),
        "rewards/rejected": over_pairs(rejected.expand_as(margins)),
        "rewards/margins": over_pairs(margins),
        "rewards/accuracies": over_pairs((margins > 0).to(implied.dtype)),
        "logps/chosen": over_pairs(policy[:, :, None].expand_as(margins)),
        "logps/rejected": over_pairs(policy[:, None, :].expand_as(margins)),
        "pairs/per_prompt": pm.sum((1, 2)).to(implied.dtype).mean(),
    }


# --------------------------------------------------------------------------------------------
# VCB
# --------------------------------------------------------------------------------------------


def vcb_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float,
    lam: float = 1.0,
    reduction: str = "logsumexp",
    normalize: str = "prompt_std",
    eta: float = 1.0,
    sigma_floor: float = 0.0,
    sigma_policy: str = "floor",
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Value-based calibration loss, Eq. 19-20 of arXiv 2402.16030, with its design choices as options.

    Args: ``policy_logps``, ``ref_logps``, ``rewards``: (B, n) float; ``mask``: (B, n) bool or
    None; ``gamma`` = γ > 0; ``lam`` = λ > 0; ``reduction``: "logsumexp" (Eq. 20), "mean"
    (the "w/o" ablation of App. A.6) or "max" (the hardest pair only, the λ → 0 limit of
    logsumexp); ``normalize``, ``eta``, ``sigma_floor``, ``sigma_policy``: how rewards are scaled,
    below (defaults = the paper); ``n_tokens``: accepted and ignored.
    Returns ``(losses (B,), metrics)``.

    For each prompt with m valid responses and every valid pair i < j (K = m(m-1)/2 pairs)::

        l_ij = [γ(Δπ_i - Δπ_j) - (s_i - s_j)]²,   Δπ = log π - log π_sft            (Eq. 19)
        logsumexp:  L = λ·log Σ_{i<j} exp(l_ij/λ) - λ·log K
        mean:       L = (1/K) Σ_{i<j} l_ij
        max:        L = max_{i<j} l_ij

    where s are the prompt's rewards, scaled by ``normalize``:

    * ``"prompt_std"`` (Eq. 10, the paper): s = r/σ_r(x), σ_r(x) the POPULATION std of the
      prompt's valid rewards (divisor m);
    * ``"batch_std"``: s = r/σ_B, one σ_B for the whole (micro-)batch: the population std of the
      rewards centred on their prompt's mean, pooled over the prompts with pairs (the "group mean,
      batch std" of REINFORCE++-baseline). Prompts are then no longer independent: a prompt's loss
      depends on the others in the batch (and so on ``batch_size``);
    * ``"none"``: s = η·r with a fixed scale ``eta`` = η > 0. Then each pair term is exactly
      NeMo-Aligner's ``rpo_sq`` loss, (β·(Δπ_w - Δπ_l) - gt_reward_scale·(r_w - r_l))² with β = γ
      and gt_reward_scale = η, and REBEL's pair term at its first iteration (π_t = π_sft),
      (1/η_REBEL·(Δπ_i - Δπ_j) - (r_i - r_j))², with γ = 1/η_REBEL and η = 1; with n = 2 and
      reduction="mean" the loss is that pair term itself;
    * ``"rank"``: s = the prompt's centred ranks (ties share their mean rank) divided by their
      population std: Eq. 10 applied to ranks instead of values, a value-free control (invariant
      to any increasing transform of the rewards).

    ``sigma_floor`` ≥ 0 and ``sigma_policy`` act on prompts with a small reward spread (the Dr. GRPO
    critique of per-group std normalisation applies to Eq. 10 too: it blows up near-ties):
    ``"floor"`` divides by max(σ, sigma_floor) (σ = σ_r(x) for prompt_std, σ_B for batch_std; it
    needs one of those two when sigma_floor > 0); ``"drop"`` gives L = 0 and zero gradient to
    every prompt whose σ_r(x) < sigma_floor (any ``normalize``; dropped prompts are left out of σ_B).

    The per-prompt constant ``-λ·log K`` changes no gradient; it makes L ≥ 0 with L = 0 exactly
    when Eq. 12 holds (the paper's "minimum value of 0"). Prompts with m < 2 get L = 0 and zero
    gradient.

    σ = 0 (all valid rewards equal): the reward term is computed from raw differences
    ``(r_i - r_j)/σ``, which are exactly 0, and σ is floored at sqrt(finfo.tiny) only to keep the
    division finite; so the loss pulls the prompt's log-ratios Δπ together (Eq. 12 with equal
    rewards). There is no relative eps: for any σ > 0 prompt_std (and rank) is exactly invariant
    to shifting and positively scaling a prompt's rewards, so rewards differing only by rounding
    noise are treated as different (quantise upstream, or use ``sigma_floor``, if that matters).

    Relation to the paper's other forms (m valid responses, K = m(m-1)/2, L_λ = this loss):

    * Eq. 20 sums j from i, adding the m diagonal terms l_ii = 0 (each contributes e^0 = 1):
      ``Eq20_λ = λ·log(K·exp(L_λ/λ) + m)``. Same minimiser, but not a constant shift: its
      gradient is that of L_λ times S/(S+m), S = Σ_{i<j} exp(l_ij/λ).
    * App. A.4 takes λ·logsumexp over all m² entries of ((s - sᵀ)**2)/2 with
      s_i = γΔπ_i - r_i/σ (so s_i - s_j is Eq. 19's inner term): both orders of every pair plus
      the diagonal, at half the value, i.e. temperature 2λ:
      ``A4_λ = λ·log(2K·exp(L_{2λ}/(2λ)) + m)``.
      (A.4 also calls ``rewards.std()``, Bessel-corrected; here Eq. 10's population std is used.)
    * With reduction="mean", the mean over i<j equals the mean over ordered i≠j; the mean of A.4's
      full m×m matrix /2 is ``(m-1)/(2m)·L``.
    """
    fn = "vcb_loss"
    _check_positive(fn, "gamma", gamma)
    _check_positive(fn, "lam", lam)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    _check_choice(fn, "normalize", normalize, NORMALIZES)
    _check_positive(fn, "eta", eta)
    _check_nonnegative(fn, "sigma_floor", sigma_floor)
    _check_choice(fn, "sigma_policy", sigma_policy, SIGMA_POLICIES)
    if sigma_floor > 0 and sigma_policy == "floor" and normalize not in ("prompt_std", "batch_std"):
        raise ValueError(f"{fn}: sigma_floor={sigma_floor!r} with sigma_policy='floor' floors the σ that "
                         f"normalize divides by, and normalize={normalize!r} divides by none; allowed with a floor: "
                         "'prompt_std', 'batch_std' (or use sigma_policy='drop')")
    policy, ref, rw, mask, _ = _prepare(fn, policy_logps, ref_logps, rewards, mask, n_tokens, need_ref=True)
    tiny = torch.finfo(policy.dtype).tiny

    # 1. σ_r(x), Eq. 10: population std over the valid responses of each prompt; which prompts count.
    m = mask.sum(-1)  # (B,)
    var, centred = _prompt_var(rw, mask)  # (B,), (B, n): rewards minus their prompt's mean (0 if padded)
    sigma_r = var.sqrt()  # (B,), 0 on ties
    has_pairs = m >= 2
    dropped = has_pairs & (sigma_r < sigma_floor) if sigma_policy == "drop" else torch.zeros_like(has_pairs)
    keep = has_pairs & ~dropped  # (B,)
    floor = sigma_floor if sigma_policy == "floor" else 0.0

    # 2. Scaled rewards s (B, n): target gaps s_i - s_j from raw differences (exactly 0 on ties).
    # σ² is floored at finfo.tiny before the square root (σ ≥ sqrt(tiny)), then at sigma_floor when flooring.
    if normalize == "prompt_std":
        values, div = rw, var.clamp_min(tiny).sqrt().clamp_min(floor)  # (B,)
    elif normalize == "batch_std":
        rows = keep[:, None] & mask  # (B, n): the responses of the prompts that count
        var_b = torch.where(rows, centred, 0.0).pow(2).sum() / rows.sum().clamp_min(1)  # (): pooled, centred per prompt
        values, div = rw, var_b.clamp_min(tiny).sqrt().clamp_min(floor).expand(rw.shape[0])  # (B,)
    elif normalize == "rank":
        values = _centred_ranks(rw, mask)  # (B, n)
        div = _prompt_var(values, mask)[0].clamp_min(tiny).sqrt()  # (B,): Eq. 10 on the ranks
    else:  # "none"
        values, div = rw * eta, torch.ones_like(var)
    gap = (values[:, :, None] - values[:, None, :]) / div[:, None, None]  # (B, n, n)

    # 3. Pair residuals of Eq. 19.
    implied = gamma * (policy - ref)  # (B, n): γΔπ
    pair_l = ((implied[:, :, None] - implied[:, None, :]) - gap).pow(2)  # (B, n, n)
    upper = _pair_mask(None, mask, "upper") & keep[:, None, None]  # (B, n, n), valid i < j of kept prompts
    K = upper.sum((1, 2))  # (B,)

    # 4. Aggregate over pairs (Eq. 20 up to the documented constant, the plain mean, or the max).
    if reduction == "mean":
        losses = _pair_mean(pair_l, upper)
    else:
        x = (pair_l / lam if reduction == "logsumexp" else pair_l).masked_fill(~upper, -math.inf).flatten(1)
        x = x.masked_fill(~keep[:, None], 0.0)  # rows without pairs: finite dummy, dropped below
        if reduction == "logsumexp":
            agg = lam * (torch.logsumexp(x, dim=-1) - K.clamp_min(1).to(x.dtype).log())  # (B,)
        else:
            agg = x.amax(-1)  # (B,)
        losses = torch.where(keep, agg, 0.0)

    metrics = _pair_metrics(implied, policy, _pair_mask(rw, mask, "all"))
    with torch.no_grad():
        n_with = has_pairs.sum().clamp_min(1)
        metrics["vcb/sigma_r"] = torch.where(has_pairs, sigma_r, 0.0).sum() / n_with
        tied = rw.masked_fill(~mask, -math.inf).amax(-1) == rw.masked_fill(~mask, math.inf).amin(-1)  # (B,)
        metrics["vcb/frac_sigma_zero"] = (has_pairs & tied).sum().to(policy.dtype) / n_with
        metrics["vcb/frac_dropped"] = dropped.sum().to(policy.dtype) / n_with
        metrics["vcb/pair_loss_mean"] = torch.where(upper, pair_l, 0.0).sum() / K.sum().clamp_min(1)
        metrics["vcb/pair_loss_max"] = torch.where(upper, pair_l, 0.0).amax() if pair_l.numel() else pair_l.sum()
    return losses, metrics


# --------------------------------------------------------------------------------------------
# Order-based baselines (Table 1, App. A.2, A.12)
# --------------------------------------------------------------------------------------------


def dpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float,
    pairs: str = "all",
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """DPO (Table 1, App. A.2): -log σ(γ[Δπ_w - Δπ_l]), Δπ = log π - log π_sft, γ = DPO's β.

    Args: (B, n) ``policy_logps``, ``ref_logps``, ``rewards``; ``mask`` (B, n) bool or None;
    ``gamma`` > 0; ``pairs`` "all" | "best_worst"; ``n_tokens`` ignored.
    Returns per-prompt mean over the prompt's preference pairs (B,), 0 if it has none.
    """
    fn = "dpo_loss"
    _check_positive(fn, "gamma", gamma)
    _check_choice(fn, "pairs", pairs, PAIRS)
    policy, ref, rw, mask, _ = _prepare(fn, policy_logps, ref_logps, rewards, mask, n_tokens, need_ref=True)
    implied = gamma * (policy - ref)  # (B, n)
    margin = implied[:, :, None] - implied[:, None, :]  # (B, n, n): [b, w, l]
    pm = _pair_mask(rw, mask, pairs)
    losses = _pair_mean(-F.logsigmoid(margin), pm)
    return losses, _pair_metrics(implied, policy, pm)


def ipo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float,
    pairs: str = "all",
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """IPO (App. A.12, Azar et al. 2023): (Δπ_w - Δπ_l - γ⁻¹/2)², Δπ = log π - log π_sft.

    Args as :func:`dpo_loss`. Returns per-prompt mean over pairs (B,), 0 if none.
    Metrics' implied rewards are γΔπ as for DPO.
    """
    fn = "ipo_loss"
    _check_positive(fn, "gamma", gamma)
    _check_choice(fn, "pairs", pairs, PAIRS)
    policy, ref, rw, mask, _ = _prepare(fn, policy_logps, ref_logps, rewards, mask, n_tokens, need_ref=True)
    delta = policy - ref  # (B, n)
    margin = delta[:, :, None] - delta[:, None, :]  # (B, n, n)
    pm = _pair_mask(rw, mask, pairs)
    losses = _pair_mean((margin - 1.0 / (2.0 * gamma)).pow(2), pm)
    return losses, _pair_metrics(gamma * delta, policy, pm)


def slic_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float,
    delta: float = 1.0,
    sft_weight: float = 1.0,
    pairs: str = "all",
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """SLiC (Eq. 8): max(0, δ - γ log π(y_w) + γ log π(y_l)) + sft_weight · NLL(best response).

    Args: (B, n) ``policy_logps`` and ``rewards``; ``ref_logps`` unused (may be None);
    ``mask`` (B, n) bool or None; ``gamma`` > 0; ``delta`` = margin δ ≥ 0; ``sft_weight`` ≥ 0;
    ``pairs`` "all" | "best_worst"; ``n_tokens`` (B, n) makes the regulariser per token.
    The hinge is averaged over the prompt's pairs (0 if none). The cross-entropy regulariser
    (Sec. 5.3) is the NLL of the highest-reward valid response (first on ties; applied whenever
    the prompt has one valid response, pairs or not): -logp/n_tokens, or -logp without n_tokens.
    """
    fn = "slic_loss"
    _check_positive(fn, "gamma", gamma)
    _check_nonnegative(fn, "delta", delta)
    _check_nonnegative(fn, "sft_weight", sft_weight)
    _check_choice(fn, "pairs", pairs, PAIRS)
    policy, _, rw, mask, nt = _prepare(fn, policy_logps, ref_logps, rewards, mask, n_tokens, need_ref=False)
    implied = gamma * policy  # (B, n): Table 1, r = γ log π
    hinge = (delta - (implied[:, :, None] - implied[:, None, :])).clamp_min(0.0)  # (B, n, n)
    pm = _pair_mask(rw, mask, pairs)
    rank = _pair_mean(hinge, pm)  # (B,)
    nll = _nll(policy, _select_top(rw, mask, 1), nt)  # (B,)
    metrics = _pair_metrics(implied, policy, pm)
    metrics["slic/hinge"] = rank.detach().mean()
    metrics["slic/sft_nll"] = nll.detach().mean()
    return rank + sft_weight * nll, metrics


def rrhf_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    sft_weight: float = 1.0,
    length_penalty: float = 1.0,
    pairs: str = "all",
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """RRHF (Eq. 1; Yuan et al. 2023): Σ_{r_w > r_l} max(0, p_l - p_w) + sft_weight · NLL(best).

    Args: (B, n) ``policy_logps`` and ``rewards``; ``ref_logps`` unused (may be None);
    ``mask`` (B, n) bool or None; ``sft_weight`` ≥ 0; ``length_penalty`` ≥ 0;
    ``pairs`` "all" | "best_worst"; ``n_tokens`` (B, n) token counts.
    Scores are p_i = logp_i / n_tokens_i**length_penalty (raw logp without ``n_tokens``).
    The ranking term is SUMMED over the prompt's pairs, as in RRHF's code (``-diff[aval].sum()``),
    i.e. (mean over pairs) × (number of pairs); 0 if none. The SFT term is the (per-token, with
    ``n_tokens``) NLL of the highest-reward valid response, as RRHF's ``sft_loss``.
    """
    fn = "rrhf_loss"
    _check_nonnegative(fn, "sft_weight", sft_weight)
    _check_nonnegative(fn, "length_penalty", length_penalty)
    _check_choice(fn, "pairs", pairs, PAIRS)
    policy, _, rw, mask, nt = _prepare(fn, policy_logps, ref_logps, rewards, mask, n_tokens, need_ref=False)
    scores = policy if nt is None else policy / nt.pow(length_penalty)  # (B, n)
    pm = _pair_mask(rw, mask, pairs)
    hinge = (scores[:, None, :] - scores[:, :, None]).clamp_min(0.0)  # (B, n, n): [b, w, l] = max(0, p_l - p_w)
    rank = torch.where(pm, hinge, 0.0).sum((1, 2))  # (B,)
    nll = _nll(policy, _select_top(rw, mask, 1), nt)  # (B,)
    metrics = _pair_metrics(scores, policy, pm)
    metrics["rrhf/rank"] = rank.detach().mean()
    metrics["rrhf/sft_nll"] = nll.detach().mean()
    return rank + sft_weight * nll, metrics


# --------------------------------------------------------------------------------------------
# Value-aware relatives: losses that read reward values other than VCB's way
# --------------------------------------------------------------------------------------------


def _nca_inputs(fn, policy_logps, ref_logps, rewards, mask, n_tokens, gamma, alpha):
    """InfoNCA's and NCA's shared start: checked inputs, γΔπ (B, n) and the reward targets
    softmax(r/α) over each prompt's valid candidates (B, n), 0 where padded."""
    _check_positive(fn, "gamma", gamma)
    _check_positive(fn, "alpha", alpha)
    policy, ref, rw, mask, _ = _prepare(fn, policy_logps, ref_logps, rewards, mask, n_tokens, need_ref=True)
    return policy, rw, mask, gamma * (policy - ref), _masked_softmax(rw / alpha, mask)


def infonca_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float,
    alpha: float = 1.0,
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """InfoNCA (Chen et al. 2024, arXiv 2402.05369, Sec. 3): listwise cross-entropy over all n candidates.

    Args: (B, n) ``policy_logps``, ``ref_logps``, ``rewards``; ``mask`` (B, n) bool or None;
    ``gamma`` = γ > 0 (InfoNCA's β); ``alpha`` = α > 0, the temperature of the reward targets;
    ``n_tokens`` ignored. Returns per-prompt losses (B,) and metrics.

    Per prompt, over its m valid candidates (the official code's ``InfoNCA`` branch of ``nca_loss``)::

        L = -Σ_i softmax_i(r/α) · log softmax_i(γΔπ),   Δπ = log π - log π_sft

    Its minimiser on the candidates is softmax(γΔπ) = softmax(r/α), i.e. π ∝ π_sft·e^{r/(αγ)}:
    Theorem 1's π_opt with α(x) = αγ. With n = 2 it is DPO with soft labels (cDPO / TRL's
    ``sigmoid`` with label_smoothing = σ(-(r_w - r_l)/α)), and DPO itself as α → 0. Prompts with
    m < 2 get L = 0 (a single candidate's target and softmax are both 1).
    """
    policy, rw, mask, implied, target = _nca_inputs(
        "infonca_loss", policy_logps, ref_logps, rewards, mask, n_tokens, gamma, alpha
    )
    has_pairs = mask.sum(-1) >= 2  # (B,)
    log_q = _masked_log_softmax(implied, mask)  # (B, n), 0 where padded
    losses = torch.where(has_pairs, -(target * log_q).sum(-1), 0.0)  # (B,)
    metrics = _pair_metrics(implied, policy, _pair_mask(rw, mask, "all"))
    with torch.no_grad():
        entropy = -(target * target.clamp_min(torch.finfo(target.dtype).tiny).log()).sum(-1)  # (B,)
        metrics["infonca/target_entropy"] = torch.where(has_pairs, entropy, 0.0).sum() / has_pairs.sum().clamp_min(1)
    return losses, metrics


def nca_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float,
    alpha: float = 1.0,
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """NCA (Chen et al. 2024, arXiv 2402.05369, Sec. 4): InfoNCA's targets on each candidate's absolute likelihood.

    Args: as :func:`infonca_loss`. Returns per-prompt losses (B,) and metrics.

    Per prompt, over its m valid candidates (the official code's ``NCA`` branch of ``nca_loss``)::

        L = -Σ_i [ softmax_i(r/α) · log σ(γΔπ_i) + (1/m) · log σ(-γΔπ_i) ]

    Each candidate is pushed up in proportion to its target and down by 1/m, so at the optimum
    γΔπ_i = log(m·softmax_i(r/α)) = r_i/α - log mean_j e^{r_j/α}: log-ratios of their own, not only
    of their differences (a policy whose candidates hold little of its mass reaches them). With
    n = 2 and one-hot targets (α → 0) it is TRL's ``nca_pair``:
    -log σ(γΔπ_w) - ½ log σ(-γΔπ_w) - ½ log σ(-γΔπ_l). Prompts with m < 2 get L = 0.
    """
    policy, rw, mask, implied, target = _nca_inputs(
        "nca_loss", policy_logps, ref_logps, rewards, mask, n_tokens, gamma, alpha
    )
    m = mask.sum(-1)  # (B,)
    terms = target * F.logsigmoid(implied) + F.logsigmoid(-implied) / m.clamp_min(1)[:, None]  # (B, n)
    losses = torch.where(m >= 2, -torch.where(mask, terms, 0.0).sum(-1), 0.0)  # (B,)
    metrics = _pair_metrics(implied, policy, _pair_mask(rw, mask, "all"))
    with torch.no_grad():
        rows = mask & (m >= 2)[:, None]
        metrics["nca/implied_mean"] = torch.where(rows, implied, 0.0).sum() / rows.sum().clamp_min(1)
    return losses, metrics


def a2po_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float,
    value_gamma: float = 1.0,
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """A*-PO-style pointwise regression (Brantley et al. 2025, arXiv 2505.20686; TRL's ``A2POTrainer``).

    Args: (B, n) ``policy_logps``, ``ref_logps``, ``rewards``; ``mask`` (B, n) bool or None;
    ``gamma`` = γ > 0 (A*-PO's β₂); ``value_gamma`` = γ' > 0 (A*-PO's β₁); ``n_tokens`` ignored.
    Returns per-prompt losses (B,) and metrics.

    Stage 1 estimates the optimal value from the prompt's m valid candidates (samples of π_sft),
    stage 2 regresses each candidate's implied reward onto the estimated optimal advantage::

        V̂(x) = γ' log (1/m) Σ_j exp(r_j/γ')
        L = (1/m) Σ_i [γΔπ_i - (r_i - V̂(x))]²,   Δπ = log π - log π_sft

    (the official ``compute_policy_loss``: (β₂·log π/π_ref + V* - r)²). The partition function is
    estimated, not differenced away as in VCB: the minimiser is Δπ_i = (r_i - V̂)/γ, Theorem 1's
    π_opt = π_sft·e^{r/γ}/Z with Z estimated by e^{V̂/γ} (exact for γ' = γ when π_sft is the
    candidates' empirical distribution). Rewards are used raw, not normalised. Prompts with m < 2
    get L = 0 (one sample gives V̂ = r, no advantage to regress onto).

    This is the offline form that fits D_t: the same π_sft candidates estimate V̂ and are regressed
    on. The paper's stage 2 regresses one fresh sample of the current policy per prompt instead.
    """
    fn = "a2po_loss"
    _check_positive(fn, "gamma", gamma)
    _check_positive(fn, "value_gamma", value_gamma)
    policy, ref, rw, mask, _ = _prepare(fn, policy_logps, ref_logps, rewards, mask, n_tokens, need_ref=True)
    m = mask.sum(-1)  # (B,)
    has_pairs = m >= 2
    x = (rw / value_gamma).masked_fill(~mask, -math.inf).masked_fill(~mask.any(-1, keepdim=True), 0.0)  # (B, n)
    value = value_gamma * (torch.logsumexp(x, -1) - m.clamp_min(1).to(rw.dtype).log())  # (B,): V̂(x)
    implied = gamma * (policy - ref)  # (B, n)
    resid = torch.where(mask, implied - (rw - value[:, None]), 0.0)  # (B, n)
    losses = torch.where(has_pairs, resid.pow(2).sum(-1) / m.clamp_min(1), 0.0)  # (B,)
    metrics = _pair_metrics(implied, policy, _pair_mask(rw, mask, "all"))
    with torch.no_grad():
        n_with = has_pairs.sum().clamp_min(1)
        rows = mask & has_pairs[:, None]
        metrics["a2po/value"] = torch.where(has_pairs, value, 0.0).sum() / n_with
        metrics["a2po/abs_residual"] = torch.where(rows, resid.abs(), 0.0).sum() / rows.sum().clamp_min(1)
    return losses, metrics


def odpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float,
    offset_scale: float = 1.0,
    pairs: str = "all",
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """ODPO (Amini et al. 2024, arXiv 2402.10571): DPO with an offset that grows with the reward gap.

    Args: (B, n) ``policy_logps``, ``ref_logps``, ``rewards``; ``mask`` (B, n) bool or None;
    ``gamma`` = γ > 0 (DPO's β); ``offset_scale`` = α ≥ 0 (0 gives DPO); ``pairs`` "all" |
    "best_worst"; ``n_tokens`` ignored. Returns per-prompt mean over pairs (B,), 0 if none.

    For every preference pair (r_w > r_l), as the official ``preference_loss(offset=True)``::

        l_wl = -log σ(γ[Δπ_w - Δπ_l] - Δ_r),   Δ_r = α·log(r_w - r_l)

    It keeps DPO's order-based pairs (and its lack of a minimiser: the gaps grow for as long as
    one trains) but uses the values as a margin. The offset is invariant to shifting a prompt's
    rewards, not to scaling them (log(c·d) = log c + log d).
    """
    fn = "odpo_loss"
    _check_positive(fn, "gamma", gamma)
    _check_nonnegative(fn, "offset_scale", offset_scale)
    _check_choice(fn, "pairs", pairs, PAIRS)
    policy, ref, rw, mask, _ = _prepare(fn, policy_logps, ref_logps, rewards, mask, n_tokens, need_ref=True)
    implied = gamma * (policy - ref)  # (B, n)
    pm = _pair_mask(rw, mask, pairs)  # (B, n, n)
    gap = torch.where(pm, rw[:, :, None] - rw[:, None, :], 1.0)  # (B, n, n): r_w - r_l > 0 on pairs, 1 elsewhere
    offset = offset_scale * gap.clamp_min(torch.finfo(rw.dtype).tiny).log()  # (B, n, n): Δ_r
    margin = implied[:, :, None] - implied[:, None, :]  # (B, n, n): [b, w, l]
    losses = _pair_mean(-F.logsigmoid(margin - offset), pm)
    metrics = _pair_metrics(implied, policy, pm)
    with torch.no_grad():
        metrics["odpo/offset"] = torch.where(pm, offset, 0.0).sum() / pm.sum().clamp_min(1)
    return losses, metrics


# --------------------------------------------------------------------------------------------
# Selection losses: ReST and plain SFT
# --------------------------------------------------------------------------------------------


def sft_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    rewards: Tensor | None,
    mask: Tensor | None = None,
    *,
    select: str = "best",
    top_k: int = 1,
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """NLL of reward-selected responses: ReST-style (Gulcehre et al. 2023) or plain SFT.

    Args: ``policy_logps`` (B, n); ``ref_logps`` unused (may be None); ``rewards`` (B, n),
    may be None for ``select="all"``; ``mask`` (B, n) bool or None; ``select``: "best" = the
    ``top_k`` highest-reward valid responses per prompt (first index on ties), "all" = every
    valid response (plain SFT); ``n_tokens`` (B, n).
    Per prompt: Σ_sel -logp / Σ_sel n_tokens (per-token NLL) with ``n_tokens``, else the mean
    per-sequence NLL over the selected responses; 0 for a prompt with no valid response.
    """
    fn = "sft_loss"
    _check_choice(fn, "select", select, SELECTS)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{fn}: top_k must be an int >= 1, got {top_k!r}")
    policy, _, rw, mask, nt = _prepare(
        fn, policy_logps, ref_logps, rewards, mask, n_tokens, need_ref=False, need_rewards=select == "best"
    )
    selected = mask if select == "all" else _select_top(rw, mask, top_k)  # (B, n) bool
    losses = _nll(policy, selected, nt)  # (B,)
    with torch.no_grad():
        count = selected.sum().clamp_min(1)
        metrics = {
            "sft/nll": losses.mean(),
            "sft/selected_per_prompt": selected.sum(-1).to(policy.dtype).mean(),
            "logps/selected": torch.where(selected, policy, 0.0).sum() / count,
        }
        if rw is not None:
            metrics["rewards/selected"] = torch.where(selected, rw, 0.0).sum() / count
    return losses, metrics


# --------------------------------------------------------------------------------------------
# Judgments: CUT (token level)
# --------------------------------------------------------------------------------------------


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, elementwise, without cancellation (Mächler 2012): log(-expm1(x)) for
    x > -log 2, log1p(-e^x) below. Both branches are finite (with finite gradients) for every x < 0,
    so ``torch.where`` back-propagates no NaN; x = 0 gives -inf."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def cut_detect(judged_logps: Tensor, policy_logps: Tensor, cut_lambda: float) -> Tensor:
    """CUT's inappropriate tokens: p(y_t | Align-N context) / p(y_t | Misalign context) > λ, on
    token log-probs of one shape, as ``log p_N - log p_M > log λ`` (no gradient). Returns bool of that shape."""
    return (judged_logps.detach() - policy_logps.detach()) > math.log(cut_lambda)


def cut_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    rewards: Tensor | None,
    mask: Tensor | None = None,
    *,
    judged_logps: Tensor,
    negative: Tensor,
    cut_alpha: float = 1.0,
    cut_lambda: float = 1.1,
    pairs: str = "all",
    n_tokens: Tensor,
) -> tuple[Tensor, Metrics]:
    """Contrastive Unlikelihood Training (CUT; Xu et al., arXiv 2312.14591), on token log-probs: the
    paper's detection set U and its losses L₁ (Align-P, Align-N) and L₂ (Misalign), below. (Equation
    numbers are not cited: ../shared/paper holds only a summary of the paper; the rule and the
    reduction were checked against the released code, named below.)

    Args:
      ``policy_logps`` (B, n, T): log p(y_t | y_<t, x⁺) of each candidate's response tokens in the
        positive context x⁺ (the instruction with no judgment, or with the positive judgment:
        ``training.cut_positive``); token t of candidate i is real iff t < ``n_tokens[b, i]``.
      ``ref_logps``: unused (may be None). ``rewards`` (B, n): read only by ``pairs="best_worst"``.
      ``mask`` (B, n) bool or None: valid candidates.
      ``judged_logps`` (B, n, T): log p(y_t | y_<t, x, j⁻) in the candidate's own negative judgment's
        context; read only where ``negative``.
      ``negative`` (B, n) bool: the candidate's judgment is negative (else positive).
      ``cut_alpha`` = α ≥ 0, the weight of the unlikelihood term; ``cut_lambda`` = λ > 0, the
        detection threshold (the paper uses λ ≥ 1); ``pairs``: "all" trains every valid candidate,
        "best_worst" only each prompt's highest- and lowest-reward one (none when all tie).
      ``n_tokens`` (B, n): response lengths (required: they are the token mask).
    Returns per-prompt losses (B,): the mean over the prompt's trained candidates (0 if none) of

      positive judgment, Align-P:  L₁ = -(1/|y|) Σ_t log p(y_t | x⁺)
      negative judgment:           L₁ + L₂, Align-N and Misalign on the same response y:
        L₁ = -(1/|y|) Σ_t log p(y_t | x, j⁻)
        L₂ = -(1/|y|) Σ_t [1(t∉U) log p(y_t | x⁺) + α·1(t∈U) log(1 - p(y_t | x⁺))]
        U  = {t : p(y_t | x, j⁻) / p(y_t | x⁺) > λ}   (detached: it only selects)

    The detection rule is a probability RATIO (equivalently p_N - λ·p_M > 0), not a difference: the
    official code's ``scale = (valid_prob / valid_prob_neg).detach(); unlike_indices = scale > threshold``
    (github.com/wwxu21/CUT, ``modeling_llama_unlikelihood.py``), threshold λ = 1.1 and unlikelihood
    weight α = 1 in its README. Tokens are averaged per response as its ``NLLLoss`` does; a negative
    candidate's loss is the paper's L₁ + L₂ (the code, with one example per micro-batch, halves it).
    Its Misalign context is the instruction without a judgment (``prompt_no_input``, the inference
    template): ``cut_positive="none"``.

    −log(1 − p) is computed as -log1mexp(log p) with log p capped at -eps of the dtype, so a token that
    a float32 softmax rounds to p = 1 costs at most -log(eps) (≈ 15.9) instead of inf (the official
    code adds 1e-5 to 1 - p = 0). Padded candidates and tokens may hold anything (inf/NaN): they are
    replaced before any arithmetic and get an exact zero gradient.
    """
    fn = "cut_loss"
    _check_nonnegative(fn, "cut_alpha", cut_alpha)
    _check_positive(fn, "cut_lambda", cut_lambda)
    _check_choice(fn, "pairs", pairs, PAIRS)
    if not isinstance(policy_logps, Tensor) or policy_logps.dim() != 3 or not policy_logps.is_floating_point():
        got = tuple(policy_logps.shape) if isinstance(policy_logps, Tensor) else type(policy_logps).__name__
        raise ValueError(f"{fn}: policy_logps must be a floating (B, n, T) tensor of token log-probs, got {got}")
    B, n, T = policy_logps.shape
    if not isinstance(judged_logps, Tensor) or judged_logps.shape != policy_logps.shape:
        got = tuple(judged_logps.shape) if isinstance(judged_logps, Tensor) else type(judged_logps).__name__
        raise ValueError(f"{fn}: judged_logps has shape {got} but policy_logps has shape {(B, n, T)}; they must match")
    for name, t in (("mask", mask), ("negative", negative), ("n_tokens", n_tokens), ("rewards", rewards)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (B, n)):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} has shape {got} but the candidates are (B, n) = {(B, n)}")
    if n_tokens is None or negative is None:
        raise ValueError(f"{fn}: n_tokens and negative are required (the token mask and each candidate's judgment)")
    for name, t in (("mask", mask), ("negative", negative)):
        if t is not None and t.dtype != torch.bool:
            raise ValueError(f"{fn}: {name} must be a bool tensor, got dtype {t.dtype}")
    if pairs == "best_worst" and rewards is None:
        raise ValueError(f"{fn}: rewards are required with pairs='best_worst' (they pick the best and worst candidate)")
    dtype, device = policy_logps.dtype, policy_logps.device
    mask = torch.ones(B, n, dtype=torch.bool, device=device) if mask is None else mask
    nt = n_tokens.masked_fill(~mask, 0)
    if bool((nt > T).any()):
        raise ValueError(f"{fn}: n_tokens go up to {int(nt.max())} but the token dimension T is {T}")

    # 1. Which candidates train, and their real tokens.
    if pairs == "best_worst":
        pm = _pair_mask(rewards.to(dtype).masked_fill(~mask, 0.0), mask, "best_worst")  # (B, n, n)
        used = pm.any(2) | pm.any(1)  # (B, n)
    else:
        used = mask
    neg = used & negative  # (B, n): Align-N + Misalign
    tok = used[..., None] & (torch.arange(T, device=device) < nt[..., None])  # (B, n, T)
    neg_tok = tok & negative[..., None]  # (B, n, T)

    # 2. Token log-probs with every padded slot replaced (a finite dummy; zero gradient there).
    lp = policy_logps.masked_fill(~tok, -1.0)  # (B, n, T): x⁺ context (Align-P / Misalign)
    lj = judged_logps.to(dtype).masked_fill(~neg_tok, -1.0)  # (B, n, T): x + j⁻ context (Align-N)

    # 3. U: the tokens the negative judgment makes more likely than the positive context, by a factor > λ.
    detected = neg_tok & cut_detect(lj, lp, cut_lambda)  # (B, n, T)

    # 4. Per token: MLE in x⁺ (Align-P, and Misalign outside U), α·(-log(1 - p)) in U; MLE in x + j⁻ (Align-N).
    unlikely = -log1mexp(lp.clamp_max(-torch.finfo(dtype).eps))  # (B, n, T): -log(1 - p)
    in_pos = torch.where(detected, cut_alpha * unlikely, -lp)  # (B, n, T)
    count = tok.sum(-1).clamp_min(1).to(dtype)  # (B, n): |y|
    cand = (torch.where(tok, in_pos, 0.0).sum(-1) + torch.where(neg_tok, -lj, 0.0).sum(-1)) / count  # (B, n)
    losses = torch.where(used, cand, 0.0).sum(-1) / used.sum(-1).clamp_min(1).to(dtype)  # (B,)

    with torch.no_grad():
        pos_tok = tok & ~negative[..., None]
        mis_tok = neg_tok & ~detected

        def token_mean(x: Tensor, where: Tensor) -> Tensor:
            return torch.where(where, x, 0.0).sum() / where.sum().clamp_min(1)

        metrics = {
            "cut/negative": neg.sum().to(dtype) / used.sum().clamp_min(1),  # share of trained candidates judged negative
            "cut/detected": detected.sum().to(dtype) / neg_tok.sum().clamp_min(1),  # share of Misalign tokens in U
            "cut/align_p_nll": token_mean(-lp, pos_tok),
            "cut/align_n_nll": token_mean(-lj, neg_tok),
            "cut/misalign_nll": token_mean(-lp, neg_tok),  # -log p(y_t | x⁺) of negative responses, U or not
            "cut/unlikelihood": token_mean(unlikely, detected),
            "cut/misalign_mle": token_mean(-lp, mis_tok),
        }
    return losses, metrics


# --------------------------------------------------------------------------------------------
# Loss registry
# --------------------------------------------------------------------------------------------


class LossType(StrEnum):
    """The losses of the paper's comparison (Sec. 5.3) and VCB's value-aware relatives, with the
    facts a trainer needs.

    ``LossType("DPO")`` / ``LossType.parse("dpo")`` are case-insensitive; an unknown name raises
    ``ValueError`` listing the allowed ones. A trainer calls every loss the same way::

        lt.fn(policy, ref, rewards, mask, n_tokens=t, **{k: getattr(cfg, k) for k in lt.hparams})
    """

    VCB = "vcb"
    DPO = "dpo"
    IPO = "ipo"
    SLIC = "slic"
    RRHF = "rrhf"
    REST = "rest"  # sft_loss, select="best" (top_k by reward)
    SFT = "sft"  # sft_loss, select="all"
    INFONCA = "infonca"  # infonca_loss (arXiv 2402.05369, Sec. 3)
    NCA = "nca"  # nca_loss (arXiv 2402.05369, Sec. 4)
    A2PO = "a2po"  # a2po_loss: A*-PO's pointwise regression (arXiv 2505.20686)
    ODPO = "odpo"  # odpo_loss (arXiv 2402.10571)
    CUT = "cut"  # cut_loss: Contrastive Unlikelihood Training on judgments (arXiv 2312.14591), token level
    BT = "bt"  # bradley_terry_loss: the reward model of Eq. 18 (scores in place of log-probs)

    @classmethod
    def _missing_(cls, value: object) -> LossType:
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if member.value == key:
                    return member
        raise ValueError(f"unknown loss type {value!r}; allowed: {', '.join(m.value for m in cls)}")

    @classmethod
    def parse(cls, name: str) -> LossType:
        """Case-insensitive lookup; ``ValueError`` naming the allowed values otherwise."""
        return cls(name)

    @property
    def needs_reference(self) -> bool:
        """True if the loss uses ``ref_logps`` (log π/π_sft)."""
        return self in (LossType.VCB, LossType.DPO, LossType.IPO, *VALUE_RELATIVES)

    @property
    def uses_reward_values(self) -> bool:
        """True for VCB and its value-aware relatives (InfoNCA, NCA, A*-PO, ODPO's offset); the
        others use the reward ORDER (pairs) or a selection. (VCB's ``normalize="rank"`` option is
        its value-free control.)"""
        return self is LossType.VCB or self in VALUE_RELATIVES

    @property
    def trains_policy(self) -> bool:
        """True for the methods notebook 03 trains on D_t (every loss but the reward model's)."""
        return self is not LossType.BT

    @property
    def pairwise(self) -> bool:
        """True if the loss compares responses of the same prompt (needs n ≥ 2; a prompt with one
        valid response gets loss 0, or only its NLL term for SLiC/RRHF). A*-PO counts: its V̂(x) is
        estimated from the prompt's candidates. CUT does not: each candidate is trained on its own judgment."""
        return self not in (LossType.REST, LossType.SFT, LossType.CUT)

    @property
    def token_level(self) -> bool:
        """True if ``fn`` takes per-token log-probs ``(B, n, T)`` (``n_tokens`` masks the tokens) instead
        of summed sequence log-probs ``(B, n)``: CUT, whose unlikelihood term acts on single tokens. The
        Trainer then scores with ``trainers.policy_token_scores``."""
        return self is LossType.CUT

    @property
    def judged(self) -> bool:
        """True if the loss learns from judgments (CUT): its groups carry each candidate's judgment
        (``CandidateGroup.judged_prompts``, ``negative``; built by ``vcb_lib.judgments``), the batch scores
        the negative candidates a second time in their own judgment's context, and ``fn`` gets them as
        ``judged_logps`` (same shape as ``policy_logps``) and ``negative`` (B, n) bool."""
        return self is LossType.CUT

    @property
    def data_hparams(self) -> tuple[str, ...]:
        """Training keys that shape this loss's inputs, not ``fn``'s keywords: CUT's ``cut_positive``
        (the context its positive candidates and its Misalign rows are scored in) and ``cut_judge`` /
        ``cut_judge_model`` (what writes its judgments). Part of an artefact's
        key like :attr:`hparams` (:meth:`active_hparams`)."""
        return _DATA_HPARAMS.get(self, ())

    def used_candidates(self, rewards: Tensor, mask: Tensor, **hparams) -> Tensor:
        """(B, n) bool: the valid candidates this loss reads with ``hparams`` (``self.hparams``).

        The others can be left out of the forward and backward passes (keeping the survivors'
        order) without changing the loss, its gradient or its metrics: DPO/IPO/ODPO/CUT with
        ``pairs="best_worst"`` read the best and the worst response, SLiC/RRHF those and the best
        (for their NLL term), ReST its ``top_k``; everything else reads every valid candidate.
        Every prompt keeps at least its first valid candidate, so it stays in the batch. Keys this
        loss does not take are ignored.
        """
        rw = rewards.masked_fill(~mask, 0.0)
        if self is LossType.REST:
            used = _select_top(rw, mask, hparams["top_k"])
        elif "pairs" in self.hparams and hparams.get("pairs") == "best_worst":
            pm = _pair_mask(rw, mask, "best_worst")  # (B, n, n)
            used = pm.any(2) | pm.any(1)
            if self in (LossType.SLIC, LossType.RRHF):
                used = used | _select_top(rw, mask, 1)
        else:
            return mask.clone()
        first = F.one_hot(mask.to(torch.int8).argmax(-1), mask.shape[1]).bool() & mask  # (B, n)
        return used | (first & ~used.any(-1, keepdim=True))

    @property
    def fn(self) -> Callable[..., tuple[Tensor, Metrics]]:
        """The loss function, with REST/SFT's ``select`` fixed."""
        return _LOSS_FNS[self]

    @property
    def hparams(self) -> tuple[str, ...]:
        """Keyword hyper-parameters ``fn`` takes (besides ``n_tokens``)."""
        return _HPARAMS[self]

    def active_hparams(self, values: dict) -> tuple[str, ...]:
        """The hyper-parameters that change this loss at ``values`` (a dict of at least
        :attr:`hparams`): VCB reads ``eta`` only with ``normalize="none"`` and ``sigma_policy`` only
        with a ``sigma_floor`` > 0. What an artefact's key records, so that changing an inactive
        one retrains nothing. :attr:`data_hparams` count as active."""
        if self is not LossType.VCB:
            return self.hparams + self.data_hparams
        inactive = {"eta"} if values["normalize"] != "none" else set()
        if not values["sigma_floor"] > 0:
            inactive.add("sigma_policy")
        return tuple(h for h in self.hparams if h not in inactive)


# VCB's value-aware relatives (issue 19): they read reward values, each its own way.
VALUE_RELATIVES = (LossType.INFONCA, LossType.NCA, LossType.A2PO, LossType.ODPO)

_LOSS_FNS: dict[LossType, Callable[..., tuple[Tensor, Metrics]]] = {
    LossType.VCB: vcb_loss,
    LossType.DPO: dpo_loss,
    LossType.IPO: ipo_loss,
    LossType.SLIC: slic_loss,
    LossType.RRHF: rrhf_loss,
    LossType.REST: functools.partial(sft_loss, select="best"),
    LossType.SFT: functools.partial(sft_loss, select="all", top_k=1),  # top_k is unused by select="all"
    LossType.INFONCA: infonca_loss,
    LossType.NCA: nca_loss,
    LossType.A2PO: a2po_loss,
    LossType.ODPO: odpo_loss,
    LossType.CUT: cut_loss,
}

_HPARAMS: dict[LossType, tuple[str, ...]] = {
    LossType.VCB: ("gamma", "lam", "reduction", "normalize", "eta", "sigma_floor", "sigma_policy"),
    LossType.DPO: ("gamma", "pairs"),
    LossType.IPO: ("gamma", "pairs"),
    LossType.SLIC: ("gamma", "delta", "sft_weight", "pairs"),
    LossType.RRHF: ("sft_weight", "length_penalty", "pairs"),
    LossType.REST: ("top_k",),
    LossType.SFT: (),
    LossType.INFONCA: ("gamma", "alpha"),
    LossType.NCA: ("gamma", "alpha"),
    LossType.A2PO: ("gamma", "value_gamma"),
    LossType.ODPO: ("gamma", "offset_scale", "pairs"),
    LossType.CUT: ("cut_alpha", "cut_lambda", "pairs"),
}

_DATA_HPARAMS: dict[LossType, tuple[str, ...]] = {LossType.CUT: ("cut_positive", "cut_judge", "cut_judge_model")}


# --------------------------------------------------------------------------------------------
# Reward model (Eq. 18)
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Bradley-Terry reward-model loss, Eq. 18 of arXiv 2402.16030: -log σ(r(x, y_w) - r(x, y_l)).

    Args: ``policy_logps`` (B, n) = the reward model's scalar scores r(x, y_i) (the trainer's
    score function fills this slot); ``ref_logps`` unused (may be None); ``rewards`` (B, n) =
    preference labels, e.g. [1, 0] for (chosen, rejected): every valid pair with label_w > label_l
    is a pair (ties form none); ``mask`` (B, n) bool or None; ``n_tokens`` ignored.
    Returns per-prompt mean over the prompt's pairs (B,), 0 for a prompt without a pair.
    Metrics: ``rewards/chosen|rejected|margins`` are scores averaged over pairs and
    ``rewards/accuracies`` is the pairwise accuracy of the reward model (Table 4).
    """
    fn = "bradley_terry_loss"
    scores, _, labels, mask, _ = _prepare(fn, policy_logps, ref_logps, rewards, mask, n_tokens, need_ref=False)
    margin = scores[:, :, None] - scores[:, None, :]  # (B, n, n): [b, w, l] = r_w - r_l
    pm = _pair_mask(labels, mask, "all")
    losses = _pair_mean(-F.logsigmoid(margin), pm)
    metrics = {k: v for k, v in _pair_metrics(scores, scores, pm).items() if not k.startswith("logps/")}
    return losses, metrics


_LOSS_FNS[LossType.BT] = bradley_terry_loss
_HPARAMS[LossType.BT] = ()
