"""CUT (Contrastive Unlikelihood Training, arXiv 2312.14591): the loss against an independent
per-token implementation (plain Python floats), its detection rule, gradients, padding and masks;
the token-level batch, the judged D_t and the Trainer's judged path on the tiny random model."""
from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch

from vcb_lib.config import PROJECT_ROOT
from vcb_lib.losses import LossType, cut_detect, cut_loss, log1mexp

F64 = torch.float64
SMOKE = PROJECT_ROOT / "params" / "smoke.yaml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# An independent implementation: a loop over prompts, candidates and tokens, in math
# --------------------------------------------------------------------------------------------


def ref_cut(policy, judged, negative, mask, n_tokens, *, alpha, lam, pairs="all", rewards=None) -> list[float]:
    """Per prompt: the mean over its trained candidates of -(1/|y|) Σ log p⁺ (positive judgment), or
    -(1/|y|) Σ log p_N + (1/|y|) Σ_t [α·-log(1 - p_M) if p_N/p_M > λ else -log p_M] (negative)."""
    B, n, _ = policy.shape
    out = []
    for b in range(B):
        valid = [i for i in range(n) if mask[b, i]]
        used = valid
        if pairs == "best_worst":
            r = {i: float(rewards[b, i]) for i in valid}
            best, worst = (max(valid, key=r.get), min(valid, key=r.get)) if valid else (None, None)
            used = [] if not valid or r[best] == r[worst] else sorted({best, worst})
        cands = []
        for i in used:
            m = int(n_tokens[b, i])
            lp = [float(policy[b, i, t]) for t in range(m)]
            if not negative[b, i]:
                cands.append(-sum(lp) / max(m, 1))
                continue
            lj = [float(judged[b, i, t]) for t in range(m)]
            l2 = 0.0
            for t in range(m):
                p_m, p_n = math.exp(lp[t]), math.exp(lj[t])
                l2 += alpha * -math.log(1.0 - p_m) if p_n / p_m > lam else -lp[t]
            cands.append(-sum(lj) / max(m, 1) + l2 / max(m, 1))
        out.append(sum(cands) / len(cands) if cands else 0.0)
    return out


def cut_batch(seed: int, B: int = 5, n: int = 4, T: int = 7, dtype=F64):
    """Random token log-probs in (-3.05, -0.05) (judged ones near them, so some tokens pass λ and some
    do not), negatives, valid candidates (row 0 all, row 1 none), response lengths 0..T, rewards."""
    g = torch.Generator().manual_seed(seed)
    policy = -0.05 - 3 * torch.rand(B, n, T, generator=g, dtype=dtype)
    judged = (policy + 0.6 * torch.randn(B, n, T, generator=g, dtype=dtype)).clamp_max(-0.01)
    negative = torch.rand(B, n, generator=g) < 0.6
    mask = torch.rand(B, n, generator=g) < 0.8
    mask[0], mask[1] = True, False
    n_tokens = torch.randint(0, T + 1, (B, n), generator=g)
    rewards = torch.randint(-2, 3, (B, n), generator=g).to(dtype)  # ties included
    return policy, judged, negative, mask, n_tokens, rewards


def call(policy, judged, negative, mask, n_tokens, rewards=None, **kw):
    kw = {"cut_alpha": 0.7, "cut_lambda": 1.1, **kw}
    return cut_loss(policy, None, rewards, mask, judged_logps=judged, negative=negative, n_tokens=n_tokens, **kw)


def test_loss_by_hand():
    """One positive and one negative candidate, probabilities chosen so that tokens 0 and 2 of the
    negative one pass λ = 1.1 (ratios 1.2, 0.5, 3.0)."""
    log = math.log
    pos, p_m, p_n = [0.5, 0.25, 0.8], [0.5, 0.2, 0.1], [0.6, 0.1, 0.3]
    policy = torch.tensor([[[log(x) for x in pos], [log(x) for x in p_m]]], dtype=F64)
    judged = torch.tensor([[[-5.0] * 3, [log(x) for x in p_n]]], dtype=F64)  # the positive one's is never read
    loss, metrics = call(policy, judged, torch.tensor([[False, True]]), None, torch.tensor([[3, 3]]), cut_alpha=0.5)
    align_p = -(log(0.5) + log(0.25) + log(0.8)) / 3
    align_n = -(log(0.6) + log(0.1) + log(0.3)) / 3
    misalign = (0.5 * -log(1 - 0.5) - log(0.2) + 0.5 * -log(1 - 0.1)) / 3
    assert loss.item() == pytest.approx((align_p + align_n + misalign) / 2, rel=1e-13)
    assert metrics["cut/detected"].item() == pytest.approx(2 / 3) and metrics["cut/negative"].item() == 0.5


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pairs", ["all", "best_worst"])
@pytest.mark.parametrize("alpha,lam", [(0.7, 1.1), (1.0, 1.0), (0.0, 2.0), (2.5, 0.8)])
def test_loss_equals_per_token_loop(seed, pairs, alpha, lam):
    policy, judged, negative, mask, n_tokens, rewards = cut_batch(seed)
    got, _ = call(policy, judged, negative, mask, n_tokens, rewards, cut_alpha=alpha, cut_lambda=lam, pairs=pairs)
    want = ref_cut(policy, judged, negative, mask, n_tokens, alpha=alpha, lam=lam, pairs=pairs, rewards=rewards)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.1, 2.0])
def test_detection_marks_exactly_the_tokens_whose_ratio_exceeds_lambda(lam):
    """cut_detect against p_N / p_M > λ computed from the probabilities; and in the loss, the
    gradient on log p_M is > 0 (unlikelihood pushes it down) exactly on those tokens, < 0 (MLE) elsewhere."""
    g = torch.Generator().manual_seed(11)
    lp_m = (0.01 + 0.98 * torch.rand(3, 4, 40, generator=g, dtype=F64)).log()
    lp_n = (0.01 + 0.98 * torch.rand(3, 4, 40, generator=g, dtype=F64)).log()
    ratio = lp_n.exp() / lp_m.exp()
    want = ratio > lam
    away = (ratio - lam).abs() > 1e-9  # rounding cannot decide these
    assert away.all() and 0.1 < want.float().mean() < 0.9
    assert torch.equal(cut_detect(lp_n, lp_m, lam), want)
    policy = lp_m.clone().requires_grad_()
    loss, metrics = call(policy, lp_n, torch.ones(3, 4, dtype=torch.bool), None, torch.full((3, 4), 40),
                         cut_lambda=lam, cut_alpha=1.0)
    loss.sum().backward()
    assert torch.equal(policy.grad > 0, want) and torch.equal(policy.grad < 0, ~want)
    assert metrics["cut/detected"].item() == pytest.approx(want.double().mean().item())
    positive = torch.zeros(3, 4, dtype=torch.bool)  # positive judgments: MLE on every token, no detection
    policy.grad = None
    call(policy, lp_n, positive, None, torch.full((3, 4), 40), cut_lambda=lam)[0].sum().backward()
    assert (policy.grad < 0).all()


def test_gradcheck_and_gradients_reach_both_contexts():
    policy, judged, negative, mask, n_tokens, rewards = cut_batch(3, B=3, n=3, T=5)
    p, j = policy.clone().requires_grad_(), judged.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: call(a, b, negative, mask, n_tokens)[0], (p, j), eps=1e-7, atol=1e-6)
    call(p, j, negative, mask, n_tokens)[0].sum().backward()
    tok = mask[..., None] & (torch.arange(5) < n_tokens[..., None])
    assert (p.grad[tok] != 0).all() and (j.grad[tok & negative[..., None]] != 0).all()
    assert (j.grad[~(tok & negative[..., None])] == 0).all()  # a positive candidate's judged context is never read


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gradients_finite_where_p_is_one(dtype):
    """log p = 0 (a softmax rounding p to 1), -1e-30, -1e-8 on detected tokens (λ < 1 lets p_M = 1 pass):
    -log(1 - p) is capped at -log(eps), the loss and gradients stay finite."""
    lp = torch.tensor([[[0.0, -1e-30, -1e-8, -200.0, -3.0]]], dtype=dtype, requires_grad=True)
    judged = torch.zeros(1, 1, 5, dtype=dtype, requires_grad=True)
    loss, metrics = call(lp, judged, torch.tensor([[True]]), None, torch.tensor([[5]]), cut_lambda=0.5, cut_alpha=1.0)
    assert metrics["cut/detected"].item() == 1.0
    assert torch.isfinite(loss).all() and loss.item() <= -math.log(torch.finfo(dtype).eps) + 3.0 / 5 + 1e-6
    loss.sum().backward()
    assert torch.isfinite(lp.grad).all() and torch.isfinite(judged.grad).all()
    from decimal import Decimal, localcontext

    x = torch.tensor([-1e-300, -1e-8, -0.5, -0.7, -1.0, -50.0, -700.0], dtype=F64)
    with localcontext() as ctx:
        ctx.prec = 1000  # enough digits for 1 - e^x at both ends
        want = torch.tensor([float((1 - Decimal(v).exp()).ln()) for v in x.tolist()], dtype=F64)
    torch.testing.assert_close(log1mexp(x), want, rtol=1e-14, atol=0)  # no cancellation near 0 or far below -log 2


@pytest.mark.parametrize("garbage", [float("inf"), float("-inf"), float("nan"), 1e30])
def test_padding_garbage_changes_nothing(garbage):
    """Garbage in every slot the loss must not read (tokens past n_tokens, padded candidates, the judged
    context of positive candidates, an extra padded candidate and token) leaves the loss exactly as it was
    and gets an exact zero gradient."""
    policy, judged, negative, mask, n_tokens, rewards = cut_batch(5)
    clean, clean_m = call(policy, judged, negative, mask, n_tokens, rewards, pairs="best_worst")
    B, n, T = policy.shape
    tok = mask[..., None] & (torch.arange(T) < n_tokens[..., None])
    read_j = tok & negative[..., None]

    def dirty(x, keep):
        x = torch.cat([x.masked_fill(~keep, garbage), torch.full((B, n, 1), garbage, dtype=F64)], 2)  # one more token
        return torch.cat([x, torch.full((B, 1, T + 1), garbage, dtype=F64)], 1)  # one more candidate

    def pad2(x, fill):
        return torch.cat([x, torch.full((B, 1), fill, dtype=x.dtype)], 1)

    p2 = dirty(policy, tok).requires_grad_()
    j2 = dirty(judged, read_j).requires_grad_()
    mask2, neg2 = pad2(mask, False), pad2(negative, True)
    nt2 = pad2(n_tokens.masked_fill(~mask, 10**9), 10**9)  # padded candidates' lengths are garbage too
    rw2 = pad2(rewards.masked_fill(~mask, garbage), garbage)
    got, got_m = call(p2, j2, neg2, mask2, nt2, rw2, pairs="best_worst")
    torch.testing.assert_close(got, clean, rtol=1e-14, atol=1e-14)
    for k in clean_m:
        torch.testing.assert_close(got_m[k], clean_m[k], rtol=1e-13, atol=1e-13, msg=k)
    got.sum().backward()
    assert torch.isfinite(p2.grad).all() and torch.isfinite(j2.grad).all()
    assert (p2.grad[:, :n, :T][~tok] == 0).all() and (p2.grad[:, n:] == 0).all() and (p2.grad[..., T:] == 0).all()
    assert (j2.grad[:, :n, :T][~read_j] == 0).all() and (j2.grad[:, n:] == 0).all()


def test_prompts_are_independent_and_float32_matches():
    policy, judged, negative, mask, n_tokens, rewards = cut_batch(8)
    batched, _ = call(policy, judged, negative, mask, n_tokens, rewards, pairs="best_worst")
    for b in range(policy.shape[0]):
        s = slice(b, b + 1)
        alone, _ = call(policy[s], judged[s], negative[s], mask[s], n_tokens[s], rewards[s], pairs="best_worst")
        torch.testing.assert_close(alone, batched[s], rtol=1e-14, atol=1e-14)
    l32, m32 = call(policy.float(), judged.float(), negative, mask, n_tokens, rewards.float(), pairs="best_worst")
    assert l32.dtype == torch.float32 and all(v.dtype == torch.float32 for v in m32.values())
    torch.testing.assert_close(l32.double(), batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_best_worst_candidates_carry_the_whole_loss(seed):
    """What the Trainer prunes (LossType.used_candidates with pairs=best_worst) changes no loss, gradient or metric."""
    policy, judged, negative, mask, n_tokens, rewards = cut_batch(seed)
    used = LossType.CUT.used_candidates(rewards, mask, pairs="best_worst", cut_alpha=0.7)
    assert (used.sum(-1) <= 2).all() and used.sum() < mask.sum()
    p = policy.clone().requires_grad_()
    full, full_m = call(p, judged, negative, mask, n_tokens, rewards, pairs="best_worst")
    (g_full,) = torch.autograd.grad(full.sum(), p)
    width = int(used.sum(-1).max())
    B, n, T = policy.shape

    def compact(x, fill):
        out = torch.full((B, width, *x.shape[2:]), fill, dtype=x.dtype)
        for b in range(B):
            out[b, :int(used[b].sum())] = x[b][used[b]]
        return out

    small = compact(policy, 0.0).requires_grad_()
    part, part_m = call(small, compact(judged, 0.0), compact(negative, False), compact(mask, False),
                        compact(n_tokens, 0), compact(rewards, 0.0), pairs="best_worst")
    (g_part,) = torch.autograd.grad(part.sum(), small)
    torch.testing.assert_close(part, full, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(compact(g_full, 0.0), g_part, rtol=1e-14, atol=1e-14)
    assert (g_full[mask & ~used] == 0).all()
    for k in full_m:
        torch.testing.assert_close(part_m[k], full_m[k], rtol=1e-14, atol=1e-14, msg=k)


def test_input_errors_name_the_argument():
    policy, judged, negative, mask, n_tokens, rewards = cut_batch(0)
    with pytest.raises(ValueError, match=r"policy_logps must be a floating \(B, n, T\) tensor"):
        call(policy[..., 0], judged[..., 0], negative, mask, n_tokens)
    with pytest.raises(ValueError, match=r"judged_logps has shape \(5, 4, 6\) but policy_logps has shape \(5, 4, 7\)"):
        call(policy, judged[..., :6], negative, mask, n_tokens)
    with pytest.raises(ValueError, match="negative must be a bool tensor"):
        call(policy, judged, negative.long(), mask, n_tokens)
    with pytest.raises(ValueError, match=r"n_tokens go up to 7 but the token dimension T is 5"):
        call(policy[..., :5], judged[..., :5], negative, mask, n_tokens.clamp_min(7))
    with pytest.raises(ValueError, match="cut_lambda must be a finite number > 0"):
        call(policy, judged, negative, mask, n_tokens, cut_lambda=0.0)
    with pytest.raises(ValueError, match="cut_alpha must be a finite number >= 0"):
        call(policy, judged, negative, mask, n_tokens, cut_alpha=-1.0)
    with pytest.raises(ValueError, match="rewards are required with pairs='best_worst'"):
        call(policy, judged, negative, mask, n_tokens, pairs="best_worst")


def test_config_registry_and_artefact_key():
    from vcb_lib.config import ConfigError, load_params, methods
    from vcb_lib.stages import artefacts

    assert "cut" in methods() and LossType.CUT.hparams == ("cut_alpha", "cut_lambda", "pairs")
    cfg = load_params(None)
    assert (cfg.training.cut_alpha, cfg.training.cut_lambda, cfg.training.cut_positive) == (1.0, 1.1, "none")
    assert artefacts.method_dir_name(cfg, "cut") == "cut-alpha1.0-lambda1.1-pairs-all-seed0"
    key = artefacts.method_key(cfg, "cut")
    assert key["training.cut_positive"] == "none" and key["judgments"].startswith("whitebox-sentiment:")
    assert "training.cut_alpha" not in artefacts.method_key(cfg, "vcb")  # another loss's key: VCB never retrains for it
    judgment = load_params(None, {"training.cut_positive": "judgment", "training.pairs": "best_worst"})
    assert artefacts.method_dir_name(judgment, "cut") == "cut-alpha1.0-lambda1.1-pairs-best_worst-positivejudgment-seed0"
    for bad, message in {"training.cut_lambda=0": "training.cut_lambda: must be > 0",
                         "training.cut_alpha=-0.5": "training.cut_alpha: must be >= 0",
                         "training.cut_positive=fake": r"training.cut_positive: expected one of 'none', 'judgment'"}.items():
        with pytest.raises(ConfigError, match=message):
            load_params(None, [bad])


# --------------------------------------------------------------------------------------------
# Token-level batches and the Trainer (tiny random model)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judged(tok, base):
    from test_trainers import judged_groups, make_groups

    return judged_groups(make_groups(tok, base, 6))


def test_token_logps_of_both_layouts_sum_to_sequence_logps(tok, base, judged):
    """batch_token_logps: left-aligned per-token values, 0 past each response, row sums = batch_logps,
    the flat and the shared-prompt layouts equal, judged rows equal to those of their own context."""
    from vcb_lib.data import collate_groups
    from vcb_lib.logps import batch_logps, batch_token_logps, sequence_token_logps

    groups = judged[:3]
    with torch.no_grad():
        flat_b = collate_groups(tok, groups, judged=True)
        shared_b = collate_groups(tok, groups, judged=True, share_prompts=True)
        assert "prompt_index" in shared_b and "prompt_index" not in flat_b
        flat, shared = batch_token_logps(base, flat_b), batch_token_logps(base, shared_b)
        torch.testing.assert_close(flat, shared, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flat.sum(-1), batch_logps(base, flat_b), rtol=1e-5, atol=1e-5)
    rows = [(g.prompt, r) for g in groups for r in g.response_ids]
    rows += [(g.judged_prompts[k], g.response_ids[k]) for g in groups for k in range(len(g.response_ids)) if g.negative[k]]
    want = sequence_token_logps(base, tok, [p for p, _ in rows], [r for _, r in rows])
    assert flat.shape[0] == len(rows) == int(flat_b["mask"].sum() + flat_b["negative"].sum())
    for i, w in enumerate(want):
        torch.testing.assert_close(flat[i, :len(w)], w, rtol=1e-5, atol=1e-5)
        assert (flat[i, len(w):] == 0).all()


def test_collate_refuses_groups_without_judgments(tok, judged):
    import dataclasses

    from vcb_lib.data import collate_groups

    plain = dataclasses.replace(judged[0], judged_prompts=None, negative=None)
    with pytest.raises(ValueError, match=r"group 'p0' has no judgment per candidate"):
        collate_groups(tok, [plain], judged=True)


@pytest.mark.parametrize("share_prompts", [True, False])
def test_trainer_loss_is_cut_loss_on_each_context(tok, base, judged, tmp_path, share_prompts):
    """The first step's logged loss equals cut_loss on token log-probs computed apart, context by context
    (positive context for every candidate, the judgment's for the negative ones): the batch's rows fold back
    to the right candidates; then the step moves the parameters."""
    from test_trainers import cfg_, params, read_log

    from vcb_lib.logps import sequence_token_logps
    from vcb_lib.trainers import Trainer, policy_token_scores

    trainer = Trainer(copy.deepcopy(base), tok, judged, "cut", cfg_(batch_size=6, max_steps=1, cut_lambda=1.05),
                      tmp_path, share_prompts=share_prompts)
    assert trainer.score_fn is policy_token_scores and trainer.share_prompts == share_prompts
    B, n = len(judged), max(len(g.response_ids) for g in judged)
    pos = sequence_token_logps(base, tok, [g.prompt for g in judged for _ in g.response_ids],
                               [r for g in judged for r in g.response_ids])
    neg = sequence_token_logps(base, tok, [p for g in judged for p in g.judged_prompts], [r for g in judged for r in g.response_ids])
    T = max(len(x) for x in pos)
    policy, judged_lp = torch.zeros(B, n, T), torch.zeros(B, n, T)
    n_tokens = torch.zeros(B, n, dtype=torch.long)
    i = 0
    for b, g in enumerate(judged):
        for k in range(len(g.response_ids)):
            policy[b, k, :len(pos[i])], judged_lp[b, k, :len(neg[i])], n_tokens[b, k] = pos[i], neg[i], len(pos[i])
            i += 1
    negative = torch.tensor([g.negative for g in judged])
    want, want_m = cut_loss(policy, None, None, None, judged_logps=judged_lp, negative=negative, n_tokens=n_tokens,
                            cut_alpha=1.0, cut_lambda=1.05)
    before = params(trainer)
    trainer.train()
    row = read_log(trainer)[0]
    assert row["loss"] == pytest.approx(want.mean().item(), rel=1e-5)
    assert row["cut/detected"] == pytest.approx(want_m["cut/detected"].item(), abs=1e-6) and 0 < row["cut/detected"] < 1
    assert row["cut/negative"] == pytest.approx(2 / 3)  # judged_groups: candidates 0 and 2 of 3 negative
    after = params(trainer)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert row["tokens"] > sum(len(r) for g in judged for r in g.response_ids)  # both contexts' rows count


def test_trainer_refuses_cut_without_judgments(tok, base, tmp_path):
    from test_trainers import cfg_, make_groups

    from vcb_lib.trainers import Trainer

    with pytest.raises(ValueError, match=r"cut learns from judgments, but 2 group\(s\) carry none"):
        Trainer(copy.deepcopy(base), tok, make_groups(tok, base, 2), "cut", cfg_(max_steps=1), tmp_path)


def test_judged_candidates_round_trip_to_groups(tok):
    """judgments.judged_candidates on a small D_t (sentiment: VADER): its columns, the two contexts, and
    candidate_groups(**JUDGED_COLUMNS) giving each group its judged prompts and negatives."""
    from vcb_lib.data import JUDGED_COLUMNS, candidate_groups
    from vcb_lib.judgments import WhiteBoxJudgments, judged_candidates, load_templates
    from vcb_lib.models import format_prompt

    prompts = ["Write a short review of the film 'Jaws'.", "Write a short review of the film 'Heat'."]
    responses = [["A wonderful, gripping film.", "Dull and boring, a terrible mess."], ["It is a film.", "Great fun!"]]
    rows = [{"prompt_id": f"p{i}", "prompt": p, "model_input": format_prompt(tok, p), "k": k, "response": r,
             "response_ids": tok(r, add_special_tokens=False).input_ids, "reward": 0.0, "ref_logp": -1.0}
            for i, (p, rs) in enumerate(zip(prompts, responses)) for k, r in enumerate(rs)]
    table = pd.DataFrame(rows)
    source = WhiteBoxJudgments("sentiment")
    out = judged_candidates(table, source, tok)
    assert list(out.judgment_positive) == [True, False, False, True]
    assert out.judgment[0] == source.positive_text and "“Dull” (-1.7)" in out.judgment[1]
    assert list(out.judgment_failed[1]) == ["negative", "negative_words"] and list(out.judgment_failed[2]) == ["neutral"]
    assert json.loads(out.judgment_values[1])["compound"] < -0.05
    assert (out.positive_input == out.model_input).all()  # cut_positive none: the evaluation's template
    context = load_templates().context
    assert out.judged_input[1] == format_prompt(tok, context.format(instruction=prompts[0], judgment=out.judgment[1]))
    both = judged_candidates(table, source, tok, positive="judgment")
    assert (both.positive_input == format_prompt(tok, context.format(instruction=prompts[0], judgment=source.positive_text)))[:2].all()
    groups = candidate_groups(out, **JUDGED_COLUMNS)
    assert [g.negative for g in groups] == [[False, True], [True, False]]
    assert groups[0].judged_prompts == list(out.judged_input[:2]) and groups[0].prompt == out.model_input[0]
    with pytest.raises(ValueError, match="unknown positive context 'fake'"):
        judged_candidates(table, source, tok, positive="fake")


# --------------------------------------------------------------------------------------------
# Notebook 05's token marks (stages.analysis.cut_marks): the training rule, on a hand-made example
# --------------------------------------------------------------------------------------------


def test_cut_marks_are_the_training_rule_on_a_hand_made_example(tmp_path, monkeypatch):
    """Two negative candidates and a positive one, the model faked by its token probabilities in each
    context. With λ = 1.1 the marks are the tokens whose p(y_t | x, j⁻) / p(y_t | x⁺) exceeds 1.1:
    A: ratios 1, 1.25, 1, 3, 2/3 → marked " movie", " awful"; B: 2.5, 0.5 → marked "The". The judgment
    quotes “awful”: evidence A's token 4 and B's token 2. By hand: 7 tokens, 3 marked, 2 evidence, 1 both.
    The marks come from losses.cut_detect, the rule CUT trains with."""
    import types

    from vcb_lib import logps, losses, models
    from vcb_lib.config import load_params
    from vcb_lib.stages import analysis, artefacts

    words = {1: "The", 2: " movie", 3: " was", 4: " awful", 5: "."}
    judgment = "The response uses a negative word: “awful”."
    rows = [  # (prompt_id, k, positive?, failed, response ids, p under x⁺, p under (x, j⁻))
        ("p1", 0, False, ["negative"], [1, 2, 3, 4, 5], [0.5, 0.4, 0.2, 0.1, 0.3], [0.5, 0.5, 0.2, 0.3, 0.2]),
        ("p1", 1, True, [], [1, 2], [0.5, 0.5], [0.5, 0.5]),
        ("p2", 0, False, ["negative", "negative_words"], [1, 4], [0.2, 0.2], [0.5, 0.1]),
    ]
    folder = tmp_path / "cut"
    folder.mkdir()
    pd.DataFrame([{"prompt_id": pid, "k": k, "prompt": f"review {pid}", "judgment": "Good." if pos else judgment,
                   "judgment_positive": pos, "judgment_failed": failed, "judgment_values": "{}", "response_ids": ids,
                   "positive_input": f"plus {pid} {k}", "judged_input": f"judged {pid} {k}"}
                  for pid, k, pos, failed, ids, _, _ in rows]).to_parquet(folder / "judged.parquet")
    probs = {f"plus {pid} {k}": p for pid, k, _, _, _, p, _ in rows} | {f"judged {pid} {k}": q for pid, k, _, _, _, _, q in rows}

    def token_logps(model, tok, prompts, responses):
        return [torch.tensor(probs[p], dtype=torch.float32).log() for p in prompts]

    detected = []

    def spy(judged, policy, lam):
        detected.append(lam)
        return losses_cut_detect(judged, policy, lam)

    losses_cut_detect = losses.cut_detect
    monkeypatch.setattr(losses, "cut_detect", spy)
    monkeypatch.setattr(artefacts, "method", lambda cfg, name, seed=None: types.SimpleNamespace(require=lambda: folder))
    monkeypatch.setattr(models, "load_policy", lambda spec, **kw: "model")
    monkeypatch.setattr(models, "load_tokenizer", lambda spec, **kw: types.SimpleNamespace(decode=lambda ids: words[ids[0]]))
    monkeypatch.setattr(logps, "sequence_token_logps", token_logps)
    cfg = load_params(SMOKE, {"run.output_root": str(tmp_path), "run.name": "r", "training.methods": ["vcb", "cut"],
                              "training.cut_lambda": 1.1})
    out = analysis.cut_marks(cfg, examples=4)
    assert detected == [1.1, 1.1]  # once per negative candidate
    a, b = out["examples"]
    assert a["tokens"] == ["The", " movie", " was", " awful", "."] and b["tokens"] == ["The", " awful"]
    assert a["marked"] == [False, True, False, True, False] and b["marked"] == [True, False]
    assert a["evidence"] == [False, False, False, True, False] and b["evidence"] == [False, True]
    assert a["log_ratio"] == pytest.approx([0.0, math.log(1.25), 0.0, math.log(3), math.log(2 / 3)], abs=1e-4)
    s = out["summary"]
    assert (s["candidates"], s["judged_candidates"], s["tokens"], s["marked"], s["evidence_tokens"]) == (2, 3, 7, 3, 2)
    assert s["negative_share"] == pytest.approx(2 / 3) and s["marked_share"] == pytest.approx(3 / 7)
    assert s["marked_that_are_evidence"] == pytest.approx(1 / 3) and s["evidence_marked"] == pytest.approx(1 / 2)
    assert out["per_feature"] == {"negative": {"candidates": 2, "tokens": 7, "marked": 3, "marked_share": pytest.approx(3 / 7)},
                                  "negative_words": {"candidates": 1, "tokens": 2, "marked": 1, "marked_share": 0.5}}
    assert "<mark> movie</mark>" in out["html"] and "<mark><u> awful</u></mark>" in out["html"]
