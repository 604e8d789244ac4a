"""On-policy methods (issue 20): the paper's PPO baseline, RLOO, GRPO and iterative VCB, as pure
functions on the tensors of one round of rollouts, and :class:`OnlineMethod`, their registry.

A round samples ``n`` responses to each of ``P`` prompts from the current policy. Shapes:

* ``(P, n)`` -- one value per response of a prompt's group (rewards, sequence advantages);
* ``(R, L)`` -- one value per response token, R = P·n responses right-padded to L tokens, ``mask``
  True on real tokens (a prefix of each row: the response up to and including its EOS).

Per-token log-probs come from the rollout loop (``vcb_lib.onpolicy``): ``old`` under the policy
that sampled the round, ``ref`` under π_sft, ``new`` under the policy being updated. Every function
returns tensors the caller reduces, plus detached diagnostics named as TRL logs them
(``objective/kl``, ``policy/clipfrac``, ``val/clipfrac``, ...). How per-token losses are reduced is
``training.online.loss_aggregation`` (:func:`aggregation_weights`): by default they are summed
over the tokens of a minibatch and divided by its token count (TRL's ``masked_mean`` for PPO, the
DAPO normalisation of TRL's ``GRPOTrainer``, verl's ``token-mean``).

Where the numbers come from:

* PPO (Schulman et al. 2017) as RLHF runs it (Ziegler et al. 2019; the implementation details of
  Huang et al. 2024, arXiv 2403.17031; TRL's ``PPOTrainer``): the reward model's score on the
  final token, a per-token KL penalty ``-β·(log π_old - log π_sft)`` on every token
  (:func:`kl_token_rewards`), GAE over the response (:func:`gae`), advantages whitened over the
  batch, the clipped surrogate (:func:`clipped_policy_loss`) and a clipped value loss
  (:func:`clipped_value_loss`).
* RLOO (Ahmadian et al. 2024, arXiv 2402.14740): the sequence reward ``r - β·KL(y)`` with a
  leave-one-out baseline over the prompt's n samples (:func:`rloo_advantages`).
* GRPO (Shao et al. 2024, arXiv 2402.03300; TRL's ``scale_rewards``): the group-centred reward,
  divided by the group's std, the batch's, or nothing (:func:`grpo_advantages`), and β times the
  k3 estimate of KL(π‖π_sft) as a loss term (:func:`k3_kl`).
* Iterative VCB: ``losses.vcb_loss`` on each round's fresh samples, against π_sft (anchored) or
  against the policy that sampled the round (REBEL-style, arXiv 2404.16767).

The peers' options, each a ``training.online`` key read only by the methods listed in
:attr:`OnlineMethod.online_keys`: the KL estimator (:func:`kl_estimate`: Schulman's k1, k2, k3),
the loss aggregation (:func:`aggregation_weights`), clip-higher's asymmetric clip and verl's dual
clip (:func:`clipped_policy_loss`), RLOO's sequence-level ratio (:func:`sequence_clipped_policy_loss`),
the reward clip (:func:`clip_scores`), an entropy bonus (the objectives' ``entropy_coef``) and
PPO's critic warm-up (the objective's ``critic_only``; the stage freezes the policy).

RLOO's and GRPO's sequence advantage is the same for every token of a response; the three
policy-gradient methods share the clipped importance-ratio surrogate. A group whose n rewards
are all equal gets advantage exactly 0 (:func:`zero_advantage_groups`): no policy-gradient signal
from it, never a NaN.
"""
from __future__ import annotations

import math
import numbers
from enum import StrEnum

import torch

Tensor = torch.Tensor
Metrics = dict[str, Tensor]

SCALE_REWARDS = ("group", "batch", "none")
REFERENCES = ("sft", "previous")
KL_ESTIMATORS = ("auto", "k1", "k2", "k3")  # auto: the method's own (ppo, rloo: k1 in the reward; grpo: k3 in the loss)
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
CLIP_LEVELS = ("sequence", "token")
SEQUENCE_LOG_RATIO_CAP = 20.0  # |Σ_t log π_new - log π_old| of one sequence is capped here before exp (verl's ±20)
STD_EPS = 1e-4  # GRPO: advantages / (std + 1e-4), as TRL's GRPOTrainer
WHITEN_EPS = 1e-8  # whitening: (x - mean) / sqrt(var + 1e-8), as TRL's masked_whiten


def _check_shapes(fn: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and (not isinstance(t, Tensor) or t.shape != ref.shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} has shape {got}, expected {tuple(ref.shape)}")


def _check_nonnegative(fn: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value!r}")


def check_finite_rewards(rewards: Tensor, where: str, prompt_ids: list[str] | None = None) -> None:
    """Raise a ValueError naming ``where`` and the first offending prompts when a reward is NaN or
    infinite: a non-finite reward never reaches an advantage (it would make every weight NaN)."""
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(-1).nonzero().flatten().tolist()
        named = [prompt_ids[i] for i in rows[:5]] if prompt_ids is not None else rows[:5]
        raise ValueError(f"{where}: {int(bad.sum())} non-finite reward(s) (first prompts {named}); rewards must be "
                         "finite numbers: check the reward model on these responses")


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (same shape) -> 0-dim; 0 when none."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the True entries of ``mask``, var with Bessel's correction
    (TRL's ``masked_whiten``); ``shift_mean=False`` adds the mean back (rewards keep their sign).
    Entries outside ``mask`` are 0. Shapes: any, ``mask`` like ``x``."""
    m = mask.to(x.dtype)
    count = m.sum()
    mean = (x * m).sum() / count.clamp_min(1)
    var = ((x - mean).pow(2) * m).sum() / (count - 1).clamp_min(1)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out * m


def zero_advantage_groups(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """(P, n) -> (P,) bool: the groups whose valid rewards are all equal (and any group with fewer
    than 2 valid responses). Their advantage is set to exactly 0: nothing to learn from them."""
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
    hi = rewards.masked_fill(~mask, -math.inf).amax(-1)
    lo = rewards.masked_fill(~mask, math.inf).amin(-1)
    return (mask.sum(-1) < 2) | (hi == lo)


# --------------------------------------------------------------------------------------------
# The peers' shared options: KL estimators, reward clip, loss aggregation
# --------------------------------------------------------------------------------------------


def kl_estimate(logps: Tensor, ref_logps: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from the log-probs of tokens sampled from π (Schulman,
    "Approximating KL divergence", 2020; OpenRLHF's, verl's and TRL's ``kl_estimator``).

    Args: ``logps``, ``ref_logps`` (R, L) per-token log π and log π_ref; ``mask`` (R, L) bool;
    ``estimator`` "k1", "k2" or "k3". Returns (R, L), 0 outside ``mask``; with d = log π_ref - log π::

        k1 = -d = log π - log π_ref          (unbiased, can be negative)
        k2 = ½·d²                            (biased, ≥ 0; its gradient is the KL's on-policy)
        k3 = exp(d) - d - 1                  (unbiased, ≥ 0: GRPO's Eq. 4 term)
    """
    if estimator not in KL_ESTIMATORS[1:]:
        raise ValueError(f"kl_estimate: unknown estimator {estimator!r}; allowed: {', '.join(KL_ESTIMATORS[1:])}")
    _check_shapes("kl_estimate", logps, ref_logps=ref_logps, mask=mask)
    d = torch.where(mask, ref_logps - logps, 0.0)
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d.pow(2)
    else:
        kl = d.exp() - d - 1
    return torch.where(mask, kl, 0.0)


def _estimator(estimator: str, auto: str) -> str:
    """``training.online.kl_estimator`` -> the estimator used: ``auto`` is the method's own."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}")
    return auto if estimator == "auto" else estimator


def clip_scores(scores: Tensor, reward_clip: float = 0.0) -> Tensor:
    """The scores clipped to [-c, c] before any advantage is computed (OpenRLHF's
    ``reward_clip_range``); ``reward_clip`` = c ≥ 0, 0 = off (``scores`` returned as is). Any shape."""
    _check_nonnegative("clip_scores", "reward_clip", reward_clip)
    return scores.clamp(-reward_clip, reward_clip) if reward_clip else scores


def aggregation_weights(mask: Tensor, aggregation: str = "token_mean", *, max_tokens: int | None = None,
                        dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """How a minibatch's per-token losses l are reduced to one number: Σ w·l / Σ units, summed over
    the minibatch's responses (the learner does the sums, whatever its micro-batch split).

    Args: ``mask`` (R, L) bool; ``aggregation``; ``max_tokens`` the rollout length cap (only
    ``constant``); ``dtype`` of the results. Returns ``(weights (R, L), units (R,))``::

        token_mean     w = 1,       units = |y_i|      Σ l / Σ_i |y_i|          (TRL PPO's masked_mean,
                                                                                 DAPO, TRL GRPO, verl)
        sequence_mean  w = 1/|y_i|, units = 1          1/R Σ_i 1/|y_i| Σ_t l_it (GRPO's Eq. 3)
        constant       w = 1,       units = max_tokens Σ l / (R·max_tokens)     (Dr. GRPO, arXiv 2503.20783)
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"aggregation_weights: unknown aggregation {aggregation!r}; allowed: {', '.join(LOSS_AGGREGATIONS)}")
    m = mask.to(dtype)
    lengths = m.sum(-1)  # (R,)
    if aggregation == "token_mean":
        return m, lengths
    if aggregation == "sequence_mean":
        return m / lengths.clamp_min(1)[:, None], torch.ones_like(lengths)
    if max_tokens is None or max_tokens < 1:
        raise ValueError(f"aggregation_weights: constant needs max_tokens >= 1 (the rollout length cap), got {max_tokens!r}")
    if int(lengths.max()) > max_tokens:
        raise ValueError(f"aggregation_weights: a response has {int(lengths.max())} tokens, more than max_tokens={max_tokens}")
    return m, torch.full_like(lengths, float(max_tokens))


# --------------------------------------------------------------------------------------------
# PPO: per-token rewards, GAE, the clipped losses
# --------------------------------------------------------------------------------------------


def kl_token_rewards(scores: Tensor, old_logps: Tensor, ref_logps: Tensor, mask: Tensor, *,
                     kl_coef: float, kl_estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """The per-token reward of RLHF's PPO (Ziegler et al. 2019; TRL ``PPOTrainer``).

    Args: ``scores`` (R,) the reward model's score of each response; ``old_logps``, ``ref_logps``
    (R, L) per-token log π_old and log π_sft of the sampled tokens; ``mask`` (R, L) bool, a prefix
    of each row (at least one token); ``kl_coef`` = β ≥ 0; ``kl_estimator`` (:func:`kl_estimate`;
    k1 = TRL's default). Returns ``(rewards (R, L), kl (R, L))``::

        kl_t = log π_old(y_t | ·) - log π_sft(y_t | ·)        (k1; or k2, k3 of the same tokens)
        r_t  = -β·kl_t + [t = last token]·score                 (0 outside mask)

    Where the score goes: on the LAST REAL token of the response (its EOS when it stopped, its
    last sampled token when cut at the length cap). That token is the episode's final action; the
    state after it is terminal (:func:`gae` gives it value 0), so the score enters that token's
    advantage in full, δ_T = r_T - V_T, and reaches earlier tokens through γλ. TRL's
    ``PPOTrainer`` adds it one position later, on the first padding slot after EOS
    (``actual_end = sequence_lengths + 1``; TRL issues #1893 and #3750): an action the policy never
    took, outside the policy loss's mask but inside the value loss's, so the EOS token sees the score
    only as γλ·(score - V_pad) plus γ·V_pad, a value of a state after the episode ended.
    """
    fn = "kl_token_rewards"
    _check_nonnegative(fn, "kl_coef", kl_coef)
    _check_shapes(fn, old_logps, ref_logps=ref_logps, mask=mask)
    if scores.shape != old_logps.shape[:1]:
        raise ValueError(f"{fn}: scores has shape {tuple(scores.shape)}, expected ({old_logps.shape[0]},)")
    if bool((mask.sum(-1) < 1).any()):
        raise ValueError(f"{fn}: every response needs at least one token (its last token carries the score)")
    kl = kl_estimate(old_logps, ref_logps, mask, kl_estimator)  # (R, L)
    rewards = -kl_coef * kl
    last = mask.sum(-1) - 1  # (R,): index of the final token (EOS when the response stopped)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each response.

    Args: ``rewards``, ``values`` (R, L) per token (``values[t]`` = V of the state before token t);
    ``mask`` (R, L) bool, a prefix of each row; ``gamma`` = γ, ``lam`` = λ in [0, 1]. The state after
    the last token is terminal (its value is 0). Returns ``(advantages, returns)`` (R, L), 0
    outside ``mask``::

        δ_t = r_t + γ·V_{t+1} - V_t,    A_t = δ_t + γλ·A_{t+1},    returns_t = A_t + V_t
    """
    fn = "gae"
    _check_shapes(fn, rewards, values=values, mask=mask)
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0 <= value <= 1:
            raise ValueError(f"{fn}: {name} must be in [0, 1], got {value!r}")
    m = mask.to(rewards.dtype)
    r, v = rewards * m, values * m  # padding: no reward, value 0 (terminal)
    L = rewards.shape[1]
    advantages = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])  # (R,)
    for t in reversed(range(L)):
        next_value = v[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_value - v[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * m
    return advantages, (advantages + v) * m


def _clip_bounds(fn: str, clip: float, clip_low: float, clip_high: float, dual_clip: float) -> tuple[float, float]:
    """(ε_low, ε_high): ``clip_low`` / ``clip_high`` where set (> 0), else ``clip``."""
    if not clip > 0:
        raise ValueError(f"{fn}: clip must be > 0, got {clip!r}")
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high), ("dual_clip", dual_clip)):
        _check_nonnegative(fn, name, value)
    if dual_clip and not dual_clip > 1:
        raise ValueError(f"{fn}: dual_clip must be 0 (off) or > 1, got {dual_clip!r}")
    return clip_low or clip, clip_high or clip


def _surrogate(ratio: Tensor, advantages: Tensor, low: float, high: float, dual_clip: float):
    """The clipped surrogate of ratios and advantages of one shape: ``(losses, clipped, dual)``,
    the last two bool (the ε clip is active; the dual clip is active)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - low, 1 + high)
    losses = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(losses, dtype=torch.bool)
    if dual_clip:  # verl: for A < 0 the loss is capped at -A·c (a ratio far above 1 cannot blow it up)
        cap = -advantages * dual_clip
        dual = (advantages < 0) & (losses > cap)
        losses = torch.where(advantages < 0, torch.minimum(losses, cap), losses)
    return losses, clipped > unclipped, dual


def clipped_policy_loss(new_logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip: float = 0.2, clip_low: float = 0.0, clip_high: float = 0.0,
                        dual_clip: float = 0.0) -> tuple[Tensor, Metrics]:
    """PPO's clipped surrogate, per token (Eq. 7 of arXiv 1707.06347, as a loss), with DAPO's
    clip-higher (arXiv 2503.14476: ε_low ≠ ε_high) and verl's dual clip (Ye et al. 2020, arXiv
    1912.09729: for A < 0 the loss is capped at -c·A).

    Args: ``new_logps`` (R, L) with grad, ``old_logps`` (R, L), ``advantages`` (R, L) (a sequence
    advantage repeated over its tokens for RLOO/GRPO); ``mask`` (R, L) bool; ``clip`` = ε > 0;
    ``clip_low``, ``clip_high`` = ε_low, ε_high (0 = ε; TRL's ``epsilon_high`` default);
    ``dual_clip`` = c > 1 (0 = off, as TRL; verl's default is 3). Returns per-token losses (R, L),
    0 outside mask, and metrics::

        ρ_t = exp(log π_new - log π_old),    l_t = max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε_low, 1+ε_high))
        dual clip, A_t < 0:                  l_t = min(l_t, -c·A_t)
    """
    fn = "clipped_policy_loss"
    _check_shapes(fn, new_logps, old_logps=old_logps, advantages=advantages, mask=mask)
    low, high = _clip_bounds(fn, clip, clip_low, clip_high, dual_clip)
    log_ratio = torch.where(mask, new_logps - old_logps, 0.0)
    ratio = log_ratio.exp()
    losses, clipped, dual = _surrogate(ratio, advantages, low, high, dual_clip)
    losses = torch.where(mask, losses, 0.0)
    with torch.no_grad():
        metrics = {"policy/clipfrac": masked_mean(clipped.to(new_logps.dtype), mask),
                   "policy/approxkl": masked_mean(0.5 * log_ratio.pow(2), mask),
                   "val/ratio": masked_mean(ratio, mask)}
        if dual_clip:
            metrics["policy/dual_clipfrac"] = masked_mean(dual.to(new_logps.dtype), mask)  # verl's pg_clipfrac_lower
    return losses, metrics


def sequence_clipped_policy_loss(new_logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *,
                                 clip: float = 0.2, clip_low: float = 0.0, clip_high: float = 0.0,
                                 dual_clip: float = 0.0) -> tuple[Tensor, Metrics]:
    """The clipped surrogate with ONE ratio per sequence (TRL's ``RLOOTrainer``): the sequence's
    importance ratio exp(Σ_t Δlog π), clipped once, times its sequence advantage.

    Args: ``new_logps`` (R, L) with grad, ``old_logps`` (R, L); ``advantages`` (R,) one per
    response; ``mask`` (R, L) bool, ≥ 1 token per row; ``clip``, ``clip_low``, ``clip_high``,
    ``dual_clip`` as :func:`clipped_policy_loss`. Returns per-token losses (R, L) and metrics::

        ρ_i = exp(Σ_t log π_new(y_it) - log π_old(y_it))      (the exponent capped at ±20, as verl)
        l_i = max(-A_i·ρ_i, -A_i·clip(ρ_i, 1-ε_low, 1+ε_high))  (dual clip as the per-token loss)
        per-token loss = l_i / |y_i| on each of y_i's tokens    (they sum to l_i)

    Spreading l_i over the tokens makes ``loss_aggregation`` reduce a sequence's loss as the sum
    of its tokens' losses: at ρ = 1 the gradient equals the per-token surrogate's under every
    aggregation, the level only changes what is clipped. TRL's RLOO takes the mean of l_i over the
    sequences: the same direction within a step, larger by the mean response length than
    ``token_mean`` and by the length cap than ``constant``. ``policy/clipfrac`` is the share of
    sequences clipped.
    """
    fn = "sequence_clipped_policy_loss"
    _check_shapes(fn, new_logps, old_logps=old_logps, mask=mask)
    if advantages.shape != new_logps.shape[:1]:
        raise ValueError(f"{fn}: advantages has shape {tuple(advantages.shape)}, expected ({new_logps.shape[0]},)")
    low, high = _clip_bounds(fn, clip, clip_low, clip_high, dual_clip)
    lengths = mask.sum(-1)  # (R,)
    if bool((lengths < 1).any()):
        raise ValueError(f"{fn}: every response needs at least one token")
    log_ratio = torch.where(mask, new_logps - old_logps, 0.0).sum(-1)  # (R, L) -> (R,)
    ratio = log_ratio.clamp(-SEQUENCE_LOG_RATIO_CAP, SEQUENCE_LOG_RATIO_CAP).exp()
    seq_losses, clipped, dual = _surrogate(ratio, advantages, low, high, dual_clip)  # (R,)
    losses = torch.where(mask, (seq_losses / lengths.to(seq_losses.dtype))[:, None], 0.0)  # (R,) -> (R, L)
    with torch.no_grad():
        metrics = {"policy/clipfrac": clipped.to(new_logps.dtype).mean(),
                   "policy/approxkl": (0.5 * log_ratio.pow(2)).mean(), "val/ratio": ratio.mean()}
        if dual_clip:
            metrics["policy/dual_clipfrac"] = dual.to(new_logps.dtype).mean()
    return losses, metrics


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
                       clip_value: float = 0.2) -> tuple[Tensor, Metrics]:
    """PPO's clipped value loss, per token (TRL ``PPOTrainer``; Huang et al. 2024).

    Args: ``values`` (R, L) with grad, ``old_values`` (R, L) at rollout time, ``returns`` (R, L)
    from :func:`gae`; ``mask`` (R, L) bool; ``clip_value`` > 0. Returns per-token losses (R, L)::

        V^clip_t = clip(V_t, old_t - c, old_t + c),    l_t = ½·max((V_t - G_t)², (V^clip_t - G_t)²)

    ``V^clip`` is TRL's ``clamp(V, old - c, old + c)``, not ``old + clamp(V - old, -c, c)``: the
    latter differs from V by rounding where nothing is clipped, so a share of unclipped tokens
    counted as clipped (3.2% logged where this form gives 0.08%). ``val/clipfrac`` is exactly 0
    when no value leaves [old - c, old + c].
    """
    fn = "clipped_value_loss"
    _check_shapes(fn, values, old_values=old_values, returns=returns, mask=mask)
    if not clip_value > 0:
        raise ValueError(f"{fn}: clip_value must be > 0, got {clip_value!r}")
    clipped = torch.clamp(values, old_values - clip_value, old_values + clip_value)
    a, b = (values - returns).pow(2), (clipped - returns).pow(2)
    losses = torch.where(mask, 0.5 * torch.maximum(a, b), 0.0)
    with torch.no_grad():
        metrics = {"val/clipfrac": masked_mean((b > a).to(values.dtype), mask), "val/mean": masked_mean(values, mask)}
    return losses, metrics


def ppo_advantages(scores: Tensor, old_logps: Tensor, ref_logps: Tensor, old_values: Tensor, mask: Tensor, *,
                   kl_coef: float, gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False,
                   kl_estimator: str = "k1") -> tuple[Tensor, Tensor, Metrics]:
    """One round's PPO targets: per-token rewards (:func:`kl_token_rewards`: the score on the last
    real token), optionally whitened without shifting their mean (TRL ``whiten_rewards``), GAE
    (:func:`gae`), then advantages whitened over the round (always, as TRL and Huang et al.).
    Shapes: ``scores`` (R,), the rest (R, L). Returns ``(advantages (R, L), returns (R, L), metrics)``."""
    rewards, kl = kl_token_rewards(scores, old_logps, ref_logps, mask, kl_coef=kl_coef, kl_estimator=kl_estimator)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, old_values, mask, gamma=gamma, lam=lam)
    advantages = masked_whiten(advantages, mask)
    with torch.no_grad():
        seq_kl = kl.sum(-1)  # (R,)
        metrics = {"objective/kl": seq_kl.mean(), "objective/scores": scores.mean(),
                   "objective/non_score_reward": (-kl_coef * seq_kl).mean(),
                   "objective/rlhf_reward": (scores - kl_coef * seq_kl).mean()}
    return advantages, returns, metrics


# --------------------------------------------------------------------------------------------
# RLOO and GRPO: sequence advantages over a prompt's n samples
# --------------------------------------------------------------------------------------------


def rloo_advantages(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; RLOO, arXiv 2402.14740): each sample's reward
    minus the mean reward of the prompt's OTHER valid samples.

    Args: ``rewards`` (P, n) (RLOO's sequence reward, ``score - β·KL``); ``mask`` (P, n) bool or
    None. Returns (P, n), 0 where padded and in zero-advantage groups (:func:`zero_advantage_groups`)::

        A_i = r_i - 1/(m-1) Σ_{j≠i} r_j  =  m/(m-1)·(r_i - mean(r))
    """
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
    _check_shapes("rloo_advantages", rewards, mask=mask)
    r = torch.where(mask, rewards, 0.0)
    m = mask.sum(-1, keepdim=True).to(r.dtype)  # (P, 1)
    others = (r.sum(-1, keepdim=True) - r) / (m - 1).clamp_min(1)  # (P, n)
    adv = torch.where(mask, r - others, 0.0)
    return adv.masked_fill(zero_advantage_groups(rewards, mask)[:, None], 0.0)


def grpo_advantages(rewards: Tensor, mask: Tensor | None = None, *, scale_rewards: str = "group") -> Tensor:
    """GRPO's group-relative advantage (arXiv 2402.03300, Eq. 3's outcome supervision; TRL's
    ``scale_rewards``).

    Args: ``rewards`` (P, n); ``mask`` (P, n) bool or None; ``scale_rewards``: "group" (divide by
    the group's std), "batch" (by the std of every valid reward of the round) or "none" (Dr. GRPO:
    no division). Stds are sample stds (Bessel), as ``torch.std``. Returns (P, n)::

        A_i = (r_i - mean_group(r)) / (std + 1e-4)     ("none": r_i - mean_group(r))

    0 where padded and in zero-advantage groups (all rewards equal: exactly 0, not 0/1e-4 noise).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"grpo_advantages: unknown scale_rewards {scale_rewards!r}; allowed: {', '.join(SCALE_REWARDS)}")
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
    _check_shapes("grpo_advantages", rewards, mask=mask)
    r = torch.where(mask, rewards, 0.0)
    m = mask.sum(-1, keepdim=True).to(r.dtype)  # (P, 1)
    mean = r.sum(-1, keepdim=True) / m.clamp_min(1)
    centred = torch.where(mask, r - mean, 0.0)
    if scale_rewards == "group":
        std = (centred.pow(2).sum(-1, keepdim=True) / (m - 1).clamp_min(1)).sqrt()  # (P, 1)
        centred = centred / (std + STD_EPS)
    elif scale_rewards == "batch":
        count = mask.sum().to(r.dtype)
        overall = r.sum() / count.clamp_min(1)
        std = (torch.where(mask, r - overall, 0.0).pow(2).sum() / (count - 1).clamp_min(1)).sqrt()
        centred = centred / (std + STD_EPS)
    return centred.masked_fill(zero_advantage_groups(rewards, mask)[:, None], 0.0)


def k3_kl(new_logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π‖π_sft) (Schulman's "approximating KL"; GRPO's Eq. 4 term):
    ``exp(ref - new) - (ref - new) - 1`` ≥ 0, (R, L), 0 outside ``mask``."""
    return kl_estimate(new_logps, ref_logps, mask, "k3")


# --------------------------------------------------------------------------------------------
# The per-token objectives of one micro-batch (the learner sums them over a minibatch's tokens)
# --------------------------------------------------------------------------------------------


def entropy_bonus(losses: Tensor, batch: dict[str, Tensor], entropy_coef: float, metrics: Metrics) -> Tensor:
    """``losses - entropy_coef · H_t`` per token (R, L), H_t the entropy of π_new(· | x, y_<t) that
    the learner puts in ``batch["entropy"]`` (R, L) when ``entropy_coef`` > 0 (TRL PPO / verl
    ``entropy_coeff``: a bonus, so subtracted); ``entropy_coef`` = 0 returns ``losses`` as is. Logs
    ``policy/entropy``."""
    _check_nonnegative("entropy_bonus", "entropy_coef", entropy_coef)
    if not entropy_coef:
        return losses
    if "entropy" not in batch:
        raise ValueError("entropy_bonus: entropy_coef > 0 needs the per-token entropies in batch['entropy'] "
                         "(OnPolicyTrainer.update(..., entropy=True))")
    with torch.no_grad():
        metrics["policy/entropy"] = masked_mean(batch["entropy"], batch["mask"])
    return losses - entropy_coef * torch.where(batch["mask"], batch["entropy"], 0.0)


def ppo_objective(new_logps: Tensor, new_values: Tensor, batch: dict[str, Tensor], *, clip: float,
                  clip_value: float, vf_coef: float, clip_low: float = 0.0, clip_high: float = 0.0,
                  dual_clip: float = 0.0, entropy_coef: float = 0.0, critic_only: bool = False) -> tuple[Tensor, Metrics]:
    """PPO, per token: clipped surrogate (:func:`clipped_policy_loss`) - entropy bonus +
    ``vf_coef`` · clipped value loss. ``batch`` holds the micro-batch's ``old_logps``,
    ``old_values``, ``advantages``, ``returns``, ``mask`` (R, L) (and ``entropy``, see
    :func:`entropy_bonus`). ``critic_only`` (a critic warm-up round, ``critic_warmup_rounds``): the
    loss is the value loss alone (the policy terms times 0, so every parameter keeps a gradient
    under DDP; the learner leaves the policy's parameters unstepped)."""
    pg, metrics = clipped_policy_loss(new_logps, batch["old_logps"], batch["advantages"], batch["mask"], clip=clip,
                                      clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    vf, vmetrics = clipped_value_loss(new_values, batch["old_values"], batch["returns"], batch["mask"], clip_value=clip_value)
    with torch.no_grad():
        metrics |= vmetrics | {"loss/policy": masked_mean(pg, batch["mask"]), "loss/value": masked_mean(vf, batch["mask"])}
    policy = entropy_bonus(pg, batch, entropy_coef, metrics)
    return (0.0 * policy if critic_only else policy) + vf_coef * vf, metrics


def rloo_objective(new_logps: Tensor, new_values: Tensor | None, batch: dict[str, Tensor], *, clip: float,
                   clip_level: str = "sequence", clip_low: float = 0.0, clip_high: float = 0.0,
                   dual_clip: float = 0.0, entropy_coef: float = 0.0) -> tuple[Tensor, Metrics]:
    """RLOO, per token: the clipped surrogate with each response's leave-one-out advantage (its KL
    is in the reward) - entropy bonus. ``clip_level``: "sequence" (default, TRL's ``RLOOTrainer``:
    one ratio per response, :func:`sequence_clipped_policy_loss`) or "token" (a ratio per token,
    :func:`clipped_policy_loss`). ``batch``: ``old_logps``, ``advantages`` (sequence value on every
    token), ``mask`` (R, L)."""
    if clip_level not in CLIP_LEVELS:
        raise ValueError(f"rloo_objective: unknown clip_level {clip_level!r}; allowed: {', '.join(CLIP_LEVELS)}")
    surrogate, adv = clipped_policy_loss, batch["advantages"]
    if clip_level == "sequence":
        surrogate, adv = sequence_clipped_policy_loss, adv[:, 0]  # (R, L) -> (R,): the mask is a prefix
    pg, metrics = surrogate(new_logps, batch["old_logps"], adv, batch["mask"], clip=clip, clip_low=clip_low,
                            clip_high=clip_high, dual_clip=dual_clip)
    with torch.no_grad():
        metrics["loss/policy"] = masked_mean(pg, batch["mask"])
    return entropy_bonus(pg, batch, entropy_coef, metrics), metrics


def grpo_objective(new_logps: Tensor, new_values: Tensor | None, batch: dict[str, Tensor], *, clip: float,
                   kl_coef: float, kl_estimator: str = "auto", clip_low: float = 0.0, clip_high: float = 0.0,
                   dual_clip: float = 0.0, entropy_coef: float = 0.0) -> tuple[Tensor, Metrics]:
    """GRPO, per token: the clipped surrogate with the group-relative advantage + β·KL(π‖π_sft)
    (β = ``kl_coef``; ``kl_estimator`` auto = k3, GRPO's Eq. 4 and TRL's) - entropy bonus.
    ``batch``: ``old_logps``, ``ref_logps``, ``advantages``, ``mask`` (R, L)."""
    estimator = _estimator(kl_estimator, "k3")
    pg, metrics = clipped_policy_loss(new_logps, batch["old_logps"], batch["advantages"], batch["mask"], clip=clip,
                                      clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    kl = kl_estimate(new_logps, batch["ref_logps"], batch["mask"], estimator)
    with torch.no_grad():
        metrics |= {"loss/policy": masked_mean(pg, batch["mask"]), f"kl/{estimator}": masked_mean(kl, batch["mask"])}
    return entropy_bonus(pg, batch, entropy_coef, metrics) + kl_coef * kl, metrics


def vcb_online_objective(new_logps: Tensor, new_values: Tensor | None, batch: dict[str, Tensor],
                         **vcb_hparams) -> tuple[Tensor, Metrics]:
    """Iterative VCB, per prompt: ``losses.vcb_loss`` (Eq. 19-20) on the micro-batch's B prompts ×
    n fresh samples. ``batch``: ``mask`` (B·n, L) token mask, ``ref_seq`` (B, n) the reference's
    sequence log-probs (π_sft, or the round's sampling policy: :func:`vcb_online_prepare`),
    ``rewards`` (B, n). ``vcb_hparams``: ``LossType.VCB.hparams`` (γ, λ, ...). Returns (B,) losses."""
    from vcb_lib.losses import vcb_loss

    B, n = batch["ref_seq"].shape
    seq = torch.where(batch["mask"], new_logps, 0.0).sum(-1).view(B, n)  # (B·n, L) -> (B, n): log π(y|x)
    return vcb_loss(seq, batch["ref_seq"], batch["rewards"], **vcb_hparams)


# --------------------------------------------------------------------------------------------
# A round's targets, computed once before its update (every field (R, L) per token, or (P, n))
# --------------------------------------------------------------------------------------------


def _round_metrics(scores: Tensor, seq_kl: Tensor, zero: Tensor) -> Metrics:
    return {"objective/scores": scores.mean(), "objective/kl": seq_kl.mean(),
            "round/zero_advantage_groups": zero.to(scores.dtype).mean()}


def _broadcast(adv: Tensor, mask: Tensor) -> Tensor:
    """(P, n) sequence advantages -> (P·n, L) on each response's tokens."""
    return torch.where(mask, adv.reshape(-1, 1), 0.0)


def ppo_prepare(rollout: dict[str, Tensor], *, kl_coef: float, gae_gamma: float, gae_lambda: float,
                whiten_rewards: bool, kl_estimator: str = "auto", reward_clip: float = 0.0) -> tuple[dict[str, Tensor], Metrics]:
    """PPO's targets: ``advantages`` and ``returns`` (R, L) from :func:`ppo_advantages` (the score
    on the last real token; ``kl_estimator`` auto = k1, TRL's default) of the scores clipped by
    ``reward_clip`` (:func:`clip_scores`; the ``objective/*`` metrics are of the clipped scores).
    ``rollout``: ``scores`` (P, n), ``old_logps``, ``ref_logps``, ``old_values``, ``mask`` (R, L).
    Equal scores are no degenerate case here: the values and the KL penalty shape the advantages."""
    scores = clip_scores(rollout["scores"], reward_clip)
    adv, ret, metrics = ppo_advantages(scores.reshape(-1), rollout["old_logps"], rollout["ref_logps"],
                                       rollout["old_values"], rollout["mask"], kl_coef=kl_coef, gamma=gae_gamma,
                                       lam=gae_lambda, whiten_rewards=whiten_rewards,
                                       kl_estimator=_estimator(kl_estimator, "k1"))
    return {"advantages": adv, "returns": ret}, metrics


def _sequence_kl(rollout: dict[str, Tensor], estimator: str = "k1") -> Tensor:
    """(R, L) per-token KL estimate (:func:`kl_estimate`) of π_old against π_sft -> (P, n): summed
    over each response."""
    kl = kl_estimate(rollout["old_logps"], rollout["ref_logps"], rollout["mask"], estimator).sum(-1)
    return kl.view_as(rollout["scores"])


def rloo_prepare(rollout: dict[str, Tensor], *, kl_coef: float, kl_estimator: str = "auto",
                 reward_clip: float = 0.0) -> tuple[dict[str, Tensor], Metrics]:
    """RLOO's targets: the reward ``score - β·KL(y)`` (the score clipped by ``reward_clip``, KL
    summed over the response under the sampling policy; ``kl_estimator`` auto = k1, TRL's
    ``RLOOTrainer`` default), its leave-one-out advantage (:func:`rloo_advantages`) on every token."""
    _check_nonnegative("rloo_prepare", "kl_coef", kl_coef)
    seq_kl = _sequence_kl(rollout, _estimator(kl_estimator, "k1"))
    scores = clip_scores(rollout["scores"], reward_clip)
    reward = scores - kl_coef * seq_kl  # (P, n)
    adv = rloo_advantages(reward)
    metrics = _round_metrics(scores, seq_kl, zero_advantage_groups(reward))
    metrics["objective/rlhf_reward"] = reward.mean()
    return {"advantages": _broadcast(adv, rollout["mask"])}, metrics


def grpo_prepare(rollout: dict[str, Tensor], *, scale_rewards: str, reward_clip: float = 0.0) -> tuple[dict[str, Tensor], Metrics]:
    """GRPO's targets: the group-relative advantage of the scores clipped by ``reward_clip``
    (:func:`grpo_advantages`) on every token; its KL is a loss term (:func:`grpo_objective`), not
    part of the reward (``objective/kl`` logs its k1 under the sampling policy)."""
    scores = clip_scores(rollout["scores"], reward_clip)
    adv = grpo_advantages(scores, scale_rewards=scale_rewards)
    return ({"advantages": _broadcast(adv, rollout["mask"])},
            _round_metrics(scores, _sequence_kl(rollout), zero_advantage_groups(scores)))


def vcb_online_prepare(rollout: dict[str, Tensor], *, reference: str) -> tuple[dict[str, Tensor], Metrics]:
    """Iterative VCB's targets: ``ref_seq`` (P, n), the sequence log-probs Δπ is measured against:
    π_sft's (``reference="sft"``, anchored) or the sampling policy's, i.e. the previous round's
    result (``"previous"``, REBEL's π_t), and the ``rewards`` (P, n) (VCB normalises them itself)."""
    if reference not in REFERENCES:
        raise ValueError(f"vcb_online_prepare: unknown reference {reference!r}; allowed: {', '.join(REFERENCES)}")
    source = rollout["ref_logps"] if reference == "sft" else rollout["old_logps"]
    ref_seq = torch.where(rollout["mask"], source, 0.0).sum(-1).view_as(rollout["scores"])
    return ({"ref_seq": ref_seq, "rewards": rollout["scores"]},
            _round_metrics(rollout["scores"], _sequence_kl(rollout), zero_advantage_groups(rollout["scores"])))


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


class OnlineMethod(StrEnum):
    """The on-policy methods notebook 03 trains with rounds of rollouts (``training.online``),
    besides ``LossType``'s offline methods on D_t; ``config.methods()`` lists both. Callers ask the
    enum, not a list of names::

        m.online_keys     # training.online.* keys it reads (its artefact key holds exactly these)
        m.hparams         # training.* loss keys it reads (vcb_online: VCB's)
        m.value_model     # PPO: a value network is trained beside the policy
        m.per_token       # its objective is a per-token loss (else per prompt: vcb_online)

    Of its ``online_keys``, ``prepare_keys`` feed :attr:`prepare` and ``objective_keys`` feed
    :attr:`objective`; the rollout loop reads the rest itself (``loss_aggregation`` through
    :func:`aggregation_weights`, PPO's ``critic_warmup_rounds``, the rollout keys).
    """

    PPO = "ppo"
    RLOO = "rloo"
    GRPO = "grpo"
    VCB_ONLINE = "vcb_online"

    @classmethod
    def _missing_(cls, value: object) -> OnlineMethod:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.strip().lower():
                    return member
        raise ValueError(f"unknown online method {value!r}; allowed: {', '.join(m.value for m in cls)}")

    @property
    def online_keys(self) -> tuple[str, ...]:
        return _ONLINE_KEYS[self]

    @property
    def hparams(self) -> tuple[str, ...]:
        from vcb_lib.losses import LossType

        return LossType.VCB.hparams if self is OnlineMethod.VCB_ONLINE else ()

    def active_hparams(self, values: dict) -> tuple[str, ...]:
        """The ``training.*`` loss keys that change this method at ``values`` (VCB's rule for vcb_online)."""
        from vcb_lib.losses import LossType

        return LossType.VCB.active_hparams(values) if self is OnlineMethod.VCB_ONLINE else ()

    @property
    def prepare(self):
        """``fn(rollout, **{k: online[k] for k in prepare_keys}) -> (fields, metrics)``: the round's targets."""
        return _PREPARE[self][0]

    @property
    def prepare_keys(self) -> tuple[str, ...]:
        return _PREPARE[self][1]

    @property
    def objective(self):
        """``fn(new_logps, new_values, batch, **hparams) -> (losses, metrics)``: per-token (R, L) or,
        for vcb_online, per-prompt (B,) losses of a micro-batch."""
        return _OBJECTIVE[self][0]

    @property
    def objective_keys(self) -> tuple[str, ...]:
        """``training.online`` keys the objective takes (vcb_online: none; it takes :attr:`hparams`)."""
        return _OBJECTIVE[self][1]

    @property
    def value_model(self) -> bool:
        return self is OnlineMethod.PPO

    @property
    def per_token(self) -> bool:
        return self is not OnlineMethod.VCB_ONLINE

    @property
    def group(self) -> bool:
        """Needs n ≥ 2 samples per prompt (a baseline, a std, or pairs)."""
        return self is not OnlineMethod.PPO

    @property
    def temperature_in_logps(self) -> bool:
        """Log-probs of the update divide the logits by the rollout temperature (Huang et al. 2024:
        the ratio must compare the distribution that sampled). vcb_online reads raw log π, as
        offline VCB's Eq. 19 does."""
        return self is not OnlineMethod.VCB_ONLINE


_COMMON_KEYS = ("rounds", "prompts_per_round", "n", "temperature", "max_new_tokens", "epochs", "minibatches",
                "missing_eos_penalty")
_PG_KEYS = ("kl_estimator", "loss_aggregation", "clip_low", "clip_high", "dual_clip", "reward_clip", "entropy_coef")
_ONLINE_KEYS = {
    OnlineMethod.PPO: _COMMON_KEYS + ("kl_coef", "clip", "vf_coef", "clip_value", "gae_gamma", "gae_lambda",
                                      "whiten_rewards") + _PG_KEYS + ("critic_warmup_rounds",),
    OnlineMethod.RLOO: _COMMON_KEYS + ("kl_coef", "clip", "clip_level") + _PG_KEYS,
    OnlineMethod.GRPO: _COMMON_KEYS + ("kl_coef", "clip", "scale_rewards") + _PG_KEYS,
    OnlineMethod.VCB_ONLINE: _COMMON_KEYS + ("reference",),
}


def is_online(method: str) -> bool:
    """Whether ``method`` (a ``training.methods`` name) is trained by rounds of rollouts."""
    return method in {m.value for m in OnlineMethod}

_CLIP_KEYS = ("clip", "clip_low", "clip_high", "dual_clip", "entropy_coef")
_PREPARE = {
    OnlineMethod.PPO: (ppo_prepare, ("kl_coef", "gae_gamma", "gae_lambda", "whiten_rewards", "kl_estimator", "reward_clip")),
    OnlineMethod.RLOO: (rloo_prepare, ("kl_coef", "kl_estimator", "reward_clip")),
    OnlineMethod.GRPO: (grpo_prepare, ("scale_rewards", "reward_clip")),
    OnlineMethod.VCB_ONLINE: (vcb_online_prepare, ("reference",)),
}
_OBJECTIVE = {
    OnlineMethod.PPO: (ppo_objective, _CLIP_KEYS + ("clip_value", "vf_coef")),
    OnlineMethod.RLOO: (rloo_objective, _CLIP_KEYS + ("clip_level",)),
    OnlineMethod.GRPO: (grpo_objective, _CLIP_KEYS + ("kl_coef", "kl_estimator")),
    OnlineMethod.VCB_ONLINE: (vcb_online_objective, ()),
}
