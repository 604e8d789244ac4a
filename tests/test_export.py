"""``python -m vcb_lib export``: a run's D_t (and evaluation samples) as a datasets dataset with a card,
TRL preference pairs and TRL prompt groups; values equal D_t's, pairs as the losses form them, a stale
or damaged D_t refused, unknown formats naming the allowed ones."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest

from vcb_lib.__main__ import main
from vcb_lib.config import PROJECT_ROOT, load_params
from vcb_lib.export import ExportError, export_run, preference_pairs, prompt_groups
from vcb_lib.manifest import ArtefactError
from vcb_lib.stages import artefacts, generate

SMOKE = PROJECT_ROOT / "params" / "smoke.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as `python -m vcb_lib run` leaves it after stage 02 (tiny random π_sft, 6 prompts x
    3 candidates scored by the gold reward: ties included) and one policy's evaluation samples."""
    root = tmp_path_factory.mktemp("runs")
    cfg = load_params(SMOKE, {"run.output_root": str(root), "models.sft": False, "rewards.reward_model": "gold",
                              "sampling.num_prompts": 6})
    cfg.save()
    table, _ = generate.run(cfg, log=lambda m: None)
    samples = table.head(4).rename(columns={"sampler_logp": "policy_logp"}).assign(method="sft", split="test")
    art = artefacts.samples(cfg, "sft", "test")
    art.path.parent.mkdir(parents=True)
    samples.to_parquet(art.path, index=False)
    art.seal()
    return cfg.run_dir


def stored_dt(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "02_candidates" / "candidates.parquet")


def expected_pairs(table: pd.DataFrame, pairs: str) -> list[tuple[str, int, int]]:
    """(prompt_id, k_w, k_l) the order-based losses train on, written out plainly: every (w, l) with
    r_w > r_l, or each prompt's first best against its first worst when they differ."""
    out = []
    for pid, g in table.groupby("prompt_id", sort=False):
        k, r = list(g.sort_values("k").k), list(g.sort_values("k").reward)
        if pairs == "all":
            out += [(pid, k[w], k[l]) for w in range(len(k)) for l in range(len(k)) if r[w] > r[l]]
        elif max(r) > min(r):
            out.append((pid, k[r.index(max(r))], k[r.index(min(r))]))
    return out


def test_hf_dataset_holds_dt_and_the_evaluation_samples_with_a_card(run_dir):
    from datasets import load_from_disk

    out = export_run(run_dir, "hf", log=lambda m: None)
    assert out == run_dir / "export" / "hf"
    ds = load_from_disk(str(out))
    pd.testing.assert_frame_equal(ds["train"].to_pandas(), stored_dt(run_dir))
    evaluation = ds["evaluation"].to_pandas()
    assert len(evaluation) == 4 and set(evaluation.method) == {"sft"} and "policy_logp" in evaluation
    card = (out / "README.md").read_text()
    cfg = load_params(run_dir / "config.yaml")
    digest = artefacts.candidates(cfg).manifest()["files"]["candidates.parquet"]["sha256"]
    for fact in ("`sentiment`", "n = 3 candidates per prompt, temperature 1.0, top_p 1.0, max_new_tokens 8",
                 "the task's gold reward, VADER", "`ref_logp`", "log π_sft(y | x)", "sampling.n: 3",
                 "task_data:", digest, "Evaluation samples not built (stage 04): sft/ood, vcb/test"):
        assert fact in card, fact


@pytest.mark.parametrize("pairs", ["all", "best_worst"])
def test_trl_pairs_are_the_losses_pairs_with_the_chosen_rewarded_higher(run_dir, tmp_path, pairs):
    from datasets import load_dataset

    out = export_run(run_dir, "trl-pairs", tmp_path / "pairs", pairs=pairs, log=lambda m: None)
    rows = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache")).to_pandas()  # via the card's configs
    table = stored_dt(run_dir)
    assert list(zip(rows.prompt_id, rows.chosen_k, rows.rejected_k)) == expected_pairs(table, pairs)
    assert (rows.score_chosen > rows.score_rejected).all()
    by = table.set_index(["prompt_id", "k"])
    for r in rows.itertuples():
        w, l = by.loc[(r.prompt_id, r.chosen_k)], by.loc[(r.prompt_id, r.rejected_k)]
        assert list(r.prompt) == [{"role": "user", "content": w.prompt}]  # conversational: the chat template was applied
        assert list(r.chosen) == [{"role": "assistant", "content": w.response}]
        assert list(r.rejected) == [{"role": "assistant", "content": l.response}]
        assert (r.score_chosen, r.score_rejected) == (w.reward, l.reward)
    assert f"Pairs: `{pairs}`" in (out / "README.md").read_text()


def test_trl_groups_are_each_prompts_candidates_in_order(run_dir, tmp_path):
    out = export_run(run_dir, "trl-groups", tmp_path / "groups", log=lambda m: None)
    rows = pd.read_parquet(out / "train.parquet")
    table = stored_dt(run_dir)
    assert list(rows.prompt_id) == list(dict.fromkeys(table.prompt_id))
    for r in rows.itertuples():
        g = table[table.prompt_id == r.prompt_id].sort_values("k")
        assert [m[0]["content"] for m in r.completions] == list(g.response)
        assert list(r.rewards) == list(g.reward) and list(r.ref_logps) == list(g.ref_logp) and list(r.gold) == list(g.gold)
        assert r.prompt[0]["content"] == g.prompt.iloc[0]


def test_plain_text_prompts_and_ties():
    """Without a chat template prompts and completions are text; tied rewards never pair, and
    best_worst takes the first best and the first worst, as ``losses._pair_mask`` does."""
    table = pd.DataFrame({"prompt_id": ["a"] * 4 + ["b"] * 3, "k": [0, 1, 2, 3, 0, 1, 2],
                          "prompt": ["qa"] * 4 + ["qb"] * 3, "model_input": ["qa"] * 4 + ["qb"] * 3,
                          "response": list("wxyzuvt"), "reward": [0.5, 0.9, 0.9, 0.1, 0.2, 0.2, 0.2],
                          "ref_logp": [-1.0] * 7})
    best = preference_pairs(table, "best_worst")
    assert best[["prompt", "chosen", "rejected"]].values.tolist() == [["qa", "x", "z"]]  # b: all tied, no pair
    assert len(preference_pairs(table, "all")) == 5  # a: 0.9 > 0.5 (x2), 0.9 > 0.1 (x2), 0.5 > 0.1
    groups = prompt_groups(table)
    assert groups.completions.tolist() == [list("wxyz"), list("uvt")] and "gold" not in groups


def test_a_stale_or_damaged_dt_is_refused_and_nothing_is_written(run_dir, tmp_path, capsys):
    stale = shutil.copytree(run_dir, tmp_path / "stale", ignore=shutil.ignore_patterns("export"))
    text = (stale / "config.yaml").read_text()
    (stale / "config.yaml").write_text(text.replace("temperature: 1.0", "temperature: 0.5", 1))
    with pytest.raises(ArtefactError, match=r"candidates.parquet is stale: built for another config "
                                            r"\(sampling.temperature: 1.0 -> 0.5\); run stage 02_generate first"):
        export_run(stale, "trl-pairs", log=lambda m: None)
    assert main(["export", str(stale), "--format", "hf"]) == 2
    assert "error: 02_candidates/candidates.parquet is stale" in capsys.readouterr().err
    damaged = shutil.copytree(run_dir, tmp_path / "damaged", ignore=shutil.ignore_patterns("export"))
    path = damaged / "02_candidates" / "candidates.parquet"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ArtefactError, match="candidates.parquet is corrupt: .* does not match its checksum"):
        export_run(damaged, "trl-groups", log=lambda m: None)
    samples = shutil.copytree(run_dir, tmp_path / "samples", ignore=shutil.ignore_patterns("export"))
    path = samples / "04_eval" / "sft" / "samples-test.parquet"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # evaluation samples are checked like D_t
    with pytest.raises(ArtefactError, match="samples-test.parquet is corrupt"):
        export_run(samples, "hf", log=lambda m: None)
    assert not any((d / "export").exists() for d in (stale, damaged, samples))


def test_the_command_line_names_what_is_allowed(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--format", "csv"]) == 2
    assert "error: unknown export format 'csv'; allowed: hf, trl-pairs, trl-groups" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--format", "trl-pairs", "--pairs", "best"]) == 2
    assert "error: unknown pairing 'best'; allowed: all, best_worst" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "hf"]) == 2
    assert "holds no config.yaml: not a run folder" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="holds files that are not an earlier export"):
        export_run(run_dir, "trl-groups", foreign, log=lambda m: None)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "groups"
    assert main(["export", str(run_dir), "--format", "trl-groups", "--out", str(out)]) == 0
    assert main(["export", str(run_dir), "--format", "trl-groups", "--out", str(out)]) == 0  # an export is replaced
    assert "exported 6 prompts" in capsys.readouterr().out and sorted(p.name for p in out.iterdir()) == ["README.md", "train.parquet"]


def test_trl_prepares_the_trl_pairs_export_as_our_model_saw_it(run_dir, tmp_path):
    """TRL's own dataset preparation (the chat template DPOTrainer applies to a conversational
    dataset) turns the export back into exactly the prompt text D_t's candidates were sampled from.
    TRL is a test requirement (tests/requirements.txt, which `make test` installs): without it this fails."""
    from datasets import load_dataset
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    from vcb_lib.models import load_tokenizer

    cfg = load_params(run_dir / "config.yaml")
    tok = load_tokenizer(cfg.models.policy, cache_dir=cfg.models.cache_dir)
    out = export_run(run_dir, "trl-pairs", tmp_path / "pairs", pairs="all", log=lambda m: None)
    rows = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    by = stored_dt(run_dir).set_index(["prompt_id", "k"])
    assert len(rows) > 0
    for row in rows:
        assert is_conversational(row)
        prepared = maybe_apply_chat_template(row, tok)
        w, l = by.loc[(row["prompt_id"], row["chosen_k"])], by.loc[(row["prompt_id"], row["rejected_k"])]
        assert prepared["prompt"] == w.model_input
        assert prepared["chosen"].startswith(w.response) and prepared["rejected"].startswith(l.response)
