"""Stage 05 (notebook 05): the paper's figures for this run, from stage 04's checked metrics and
samples (``vcb_lib.plots``), and :func:`cut_marks`, which tokens CUT's rule marks. The report itself
is written by ``vcb_lib.report``."""
from __future__ import annotations

import json
from pathlib import Path

from vcb_lib import plots
from vcb_lib.config import Config
from vcb_lib.io import atomic_write_text, read_json, write_json
from vcb_lib.manifest import Artefact
from vcb_lib.stages import artefacts
from vcb_lib.stages.evaluate import read_metrics, read_samples


def run(cfg: Config) -> tuple[dict, dict[str, Path]]:
    """Draw Table 2 / 5 / 6 and Figs. 5 / 8 into ``<run>/figures/`` (on the exact tier also the
    near-tie of Figure 1 in each trained model and the exact reward-vs-KL frontier); returns the
    metrics (with ``metrics["pool"]["family"]``: :func:`pool_family`) and the figure paths by name."""
    metrics, samples = read_metrics(cfg), read_samples(cfg, "test")
    if metrics.get("pool"):
        metrics["pool"]["family"] = pool_family(cfg, metrics)
    fig_dir = cfg.stage_dir("figures")
    ref, reward = metrics["reference"], metrics["evaluation_reward_name"]
    paths = {name: fig_dir / f"{name}.png" for name in
             ("table2_win_rates", "table5_ood_win_rates", "fig5_reward_vs_kl", "table6_misalignment", "fig8_lengths")}
    plots.win_rates(metrics["win_rate"], paths["table2_win_rates"], reference=ref, reward=reward)
    if metrics.get("ood_win_rate"):
        plots.win_rates(metrics["ood_win_rate"], paths["table5_ood_win_rates"], reference=ref, reward=reward,
                        title="out-of-distribution prompts, Table 5")
    else:
        del paths["table5_ood_win_rates"]
    plots.reward_vs_kl(metrics["reward_kl"], paths["fig5_reward_vs_kl"], reward=reward, curve=metrics.get("reward_kl_curve"))
    plots.metric_bars({m: v for m, v in metrics["misalignment_rate"].items() if v is not None}, paths["table6_misalignment"], ylabel="misalignment rate",
                      title="Misalignment (A.5, Table 6)")
    plots.lengths(samples, paths["fig8_lengths"])
    if metrics.get("exact"):  # the exact tier: the near-tie of Figure 1 in the trained models, the exact frontier
        exact = metrics["exact"]
        paths |= {"exact_near_tie": fig_dir / "exact_near_tie.png", "exact_reward_vs_kl": fig_dir / "exact_reward_vs_kl.png"}
        plots.exact_near_tie(exact["train"], paths["exact_near_tie"], gamma=exact["gamma"], order=exact.get("policies"))
        plots.exact_reward_vs_kl(exact, paths["exact_reward_vs_kl"], split="train")
    return metrics, paths


FAMILY_ALPHA = 0.05  # the family-wise error rate of the report's resolution table


def pool_family(cfg: Config, metrics: dict, *, alpha: float = FAMILY_ALPHA) -> dict | None:
    """The report's resolution table as one family: the reference method's paired differences with every
    other policy (``metrics["pool"]["paired"]``, each a separate 95% CI; on the pool, or on the on-policy
    samples where the pool is not valid for one of the two: ``decided_by``) resolved
    together with the family-wise error at ``alpha`` by Holm's step-down method on percentile-bootstrap
    p-values over prompts (:func:`vcb_lib.metrics.family_wise`: enough resamples that the strictest
    level, 1 − alpha/m, has 50 beyond it). The per-prompt estimates are read back from the stored
    pool and scores (``evaluate.pool_per_prompt``, the values ``metrics["pool"]`` averages).

    Returns ``{"alpha", "method": "holm", "comparisons": {"<ref>-vs-<other>": {diff, p, p_holm, level,
    resolved, resolved_alone, bootstrap}}}``; None without a pool, a comparison, or a bootstrap."""
    from vcb_lib.metrics import family_wise
    from vcb_lib.stages.evaluate import pool_per_prompt

    pool = metrics.get("pool") or {}
    if not pool.get("paired") or cfg.evaluation.bootstrap <= 0:
        return None
    ref = pool["reference"]
    mine = pool_per_prompt(cfg, ref)
    diffs = {key: (mine - pool_per_prompt(cfg, key.split("-vs-", 1)[1])).to_numpy() for key in pool["paired"]}
    on_policy = [key for key, v in pool["paired"].items() if v.get("decided_by") == "on-policy"]
    if on_policy:  # the pool is not valid for one of its policies: its on-policy samples decide (evaluate.pool_metrics)
        from vcb_lib.stages.evaluate import evaluation_reward, on_policy_per_prompt

        samples, column = read_samples(cfg, "test"), evaluation_reward(cfg)[0]
        own = on_policy_per_prompt(samples, ref, column)
        for key in on_policy:
            diffs[key] = (own - on_policy_per_prompt(samples, key.split("-vs-", 1)[1], column)).to_numpy()
    return {"alpha": alpha, "method": "holm",
            "comparisons": family_wise(diffs, alpha=alpha, bootstrap=cfg.evaluation.bootstrap, seed=cfg.run.seed)}


CUT_MARKS_CAP = 256  # negative candidates of D_t scored for the summary (each twice: two contexts)


def cut_marks(cfg: Config, *, examples: int = 4, policy: str = "cut") -> dict:
    """Which response tokens CUT's rule marks as inappropriate, p(y_t | x, j⁻) / p(y_t | x⁺) > λ
    (``losses.cut_detect``, ``training.cut_lambda``), under the trained CUT policy (``policy="sft"``:
    under π_sft, where training started), on the negative candidates of the judged D_t it trained on
    (``03_train/<cut>/judged.parquet``; the first :data:`CUT_MARKS_CAP`), and how the marks relate to the
    features behind each judgment: the tokens a judgment quotes (its negative words, repeated n-grams,
    last words: ``judgments.evidence_mask``) are its evidence.

    An artefact (``figures/cut_marks.json``, keyed on the CUT policy's key and these arguments): the
    two scoring passes over the negative candidates run once per CUT policy, not on every run of 05.

    Returns and writes to ``figures/cut_marks.json`` (``html`` also to ``figures/cut_marks.html``):
    ``summary`` (candidates, tokens, share marked; evidence tokens, the share of marked tokens that are
    evidence against the evidence base rate, and the share of evidence marked), ``per_feature`` (for
    the candidates failing each feature: how many, share of their tokens marked), ``examples`` (the
    first ``examples`` negative candidates of different prompts: tokens, marks, evidence, log-ratio),
    ``html`` (those examples, marked tokens highlighted, evidence underlined)."""
    from html import escape

    import pandas as pd

    from vcb_lib.judgments import evidence_mask, marked_html
    from vcb_lib.logps import sequence_token_logps
    from vcb_lib.losses import cut_detect
    from vcb_lib.models import load_policy, load_tokenizer
    from vcb_lib.stages.train import JUDGED_FILE

    folder = artefacts.method(cfg, "cut").require()
    fig_dir = cfg.stage_dir("figures")
    art = Artefact(fig_dir / "cut_marks.json", "05_analysis", artefacts.method_key(cfg, "cut") | {
        "cut_marks": {"policy": policy, "examples": examples, "cap": CUT_MARKS_CAP}})
    if art.current() and (fig_dir / "cut_marks.html").is_file():
        return read_json(art.path)
    art.invalidate()
    table = pd.read_parquet(folder / JUDGED_FILE)
    neg = table[~table.judgment_positive].head(CUT_MARKS_CAP).reset_index(drop=True)
    spec = str(folder / "final") if policy == "cut" else artefacts.sft_spec(cfg)
    model = load_policy(spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir)
    tok = load_tokenizer(spec, cache_dir=cfg.models.cache_dir)
    lam = cfg.training.cut_lambda
    responses = [list(map(int, ids)) for ids in neg.response_ids]
    lp_m = sequence_token_logps(model, tok, list(neg.positive_input), responses) if len(neg) else []
    lp_n = sequence_token_logps(model, tok, list(neg.judged_input), responses) if len(neg) else []
    rows, per_feature = [], {}
    for i, r in neg.iterrows():
        tokens = [tok.decode([t]) for t in responses[i]]
        ratio = (lp_n[i] - lp_m[i]).double().numpy()  # log p_N - log p_M per token
        marked = cut_detect(lp_n[i], lp_m[i], lam).tolist()  # the rule CUT trains with
        evidence = evidence_mask(tokens, r.judgment)
        rows.append({"prompt_id": r.prompt_id, "k": int(r.k), "prompt": r.prompt, "judgment": r.judgment,
                     "failed": list(r.judgment_failed), "values": json.loads(r.judgment_values), "tokens": tokens,
                     "marked": marked, "evidence": evidence, "log_ratio": [round(float(x), 4) for x in ratio]})
        for name in r.judgment_failed:
            f = per_feature.setdefault(name, {"candidates": 0, "tokens": 0, "marked": 0})
            f["candidates"] += 1
            f["tokens"] += len(tokens)
            f["marked"] += sum(marked)
    n_tok = sum(len(r["tokens"]) for r in rows)
    n_marked = sum(sum(r["marked"]) for r in rows)
    n_ev = sum(sum(r["evidence"]) for r in rows)
    both = sum(m and e for r in rows for m, e in zip(r["marked"], r["evidence"]))
    ratio_or_none = lambda a, b: a / b if b else None  # noqa: E731
    summary = {"policy": policy, "lambda": lam, "candidates": len(rows), "judged_candidates": len(table),
               "negative_share": float((~table.judgment_positive).mean()) if len(table) else None,
               "tokens": n_tok, "marked": n_marked, "marked_share": ratio_or_none(n_marked, n_tok),
               "evidence_tokens": n_ev, "evidence_share": ratio_or_none(n_ev, n_tok),
               "marked_that_are_evidence": ratio_or_none(both, n_marked), "evidence_marked": ratio_or_none(both, n_ev)}
    for f in per_feature.values():
        f["marked_share"] = ratio_or_none(f["marked"], f["tokens"])
    chosen, seen = [], set()
    for r in rows:
        if r["prompt_id"] not in seen and len(chosen) < examples:
            chosen.append(r)
            seen.add(r["prompt_id"])
    html = "".join(f"<p><b>{escape(r['prompt'])}</b><br><i>{escape(r['judgment'])}</i><br>"
                   f"{marked_html(r['tokens'], r['marked'], r['evidence'])}</p>" for r in chosen)
    out = {"summary": summary, "per_feature": per_feature, "examples": chosen, "html": html}
    atomic_write_text(fig_dir / "cut_marks.html", "<html><body>" + html + "</body></html>\n")
    write_json(art.path, out)
    art.seal()
    return out
