"""What every stage writes and which slice of the config each artefact depends on: the whole
dependency graph of a run in one page. Freshness is ``vcb_lib.manifest.Artefact``'s rule.

==================  ===============================  ===========================================
artefact            built by                         depends on (config slice)
==================  ===============================  ===========================================
checks.json         00_theory                        run, theory
pairs.parquet       01_sft_and_reward                run, models, sampling, rewards.task/rm_prompts/rm_heldout,
                                                     the task's data (every artefact: ``upstream``)
sft/, reward_model/ 01_sft_and_reward                UPSTREAM: those + the training keys SFT/RM use
candidates.parquet  02_generate                      UPSTREAM
03_train/<method>/  03_train                         UPSTREAM + the method's training keys (+ the
                                                     evaluation keys of the Fig. 5 snapshots; + the
                                                     training.lora keys when adapters train it; CUT:
                                                     + cut_positive and the judgment templates' hash,
                                                     its judged.parquet inside)
samples-<split>     04_evaluate                      the policy's slice + the evaluation sampling keys
pool/candidates     04_evaluate                      UPSTREAM + the pool keys
pool/<policy>       04_evaluate                      the policy's slice + the pool keys
04_eval/metrics     04_evaluate                      run .. evaluation
==================  ===============================  ===========================================

With ``run.upstream`` set, a method's folder, samples and pool scores, π_sft's samples and the pool
are the upstream run's copy when it is current there (:func:`shared`): sweep and panel points draw
π_sft's evaluation once and reuse a method the upstream run trained with the same key.
"""
from __future__ import annotations

import dataclasses

from pathlib import Path

from vcb_lib.config import UPSTREAM_TRAINING_KEYS, Config
from vcb_lib.data import task_data, task_of
from vcb_lib.losses import LossType
from vcb_lib.manifest import Artefact
from vcb_lib.policy_gradient import OnlineMethod, is_online

UPSTREAM = ("run", "models", "sampling", "rewards", "data", *(f"training.{k}" for k in UPSTREAM_TRAINING_KEYS))
LOSS_HPARAMS = sorted({h for lt in LossType for h in (*lt.hparams, *lt.data_hparams)})  # training.* keys that only some losses read
CURVE_KEYS = ("curve_points", "curve_prompts", "samples_per_prompt", "temperature", "max_new_tokens")
EVAL_SAMPLING_KEYS = ("samples_per_prompt", "temperature", "max_new_tokens")
POOL_KEYS = ("pool_prompts", "pool_candidates", "pool_max_new_tokens", "max_new_tokens")
METHOD_FILES = ("final/*", "final/adapter/*", "summary.json", "log.jsonl", "curve/*",  # final/adapter/: LoRA runs
                "judged.parquet")  # judged.parquet: the judged D_t a judgment method (CUT) trained on
OFFLINE_ONLY_KEYS = ("epochs", "max_steps", "save_every", "grad_accum")  # read by the D_t trainer only: online methods count rounds, minibatches


def inputs(cfg: Config) -> dict:
    """What the config's strings do not say about the data and the rewards: ``task_data``, the prompts'
    own fingerprint (:func:`data.task_data`: an embedded task's file, your data's files and column
    mapping), and ``reward_sources``, what a reward spec computes (a callable's source file, a
    reward-model folder's files, a judge's model and rubric; ``reward_sources.fingerprint``), so that
    edited data or an edited reward function makes what was built from it stale, not silently reused."""
    from vcb_lib.reward_sources import fingerprint

    out = {"task_data": task_data(task_of(cfg))}
    r = cfg.rewards
    sources = {key: fingerprint(spec, model=r.judge_model, rubric=r.judge_rubric)
               for key, spec in (("reward_model", r.reward_model), ("evaluation", r.evaluation)) if spec}
    sources = {k: v for k, v in sources.items() if v}
    return out | ({"reward_sources": sources} if sources else {})


def upstream(cfg: Config) -> dict:
    """The UPSTREAM slice (the ``data`` section included) plus :func:`inputs`."""
    return cfg.slice(*UPSTREAM) | inputs(cfg)


def _dir(cfg: Config, stage: str) -> Path:
    return cfg.stage_dir(stage, create=False)


def theory_checks(cfg: Config) -> Artefact:
    return Artefact(_dir(cfg, "00_theory") / "checks.json", "00_theory", cfg.slice("run", "theory"))


def pairs(cfg: Config) -> Artefact:
    """Preference pairs: they depend on how they are sampled and split, not on how the reward
    model then trains on them (so its epochs and learning rate can be varied on the same pairs)."""
    return Artefact(_dir(cfg, "01_models") / "pairs.parquet", "01_sft_and_reward",
                    cfg.slice("run", "models", "sampling", "rewards.task", "rewards.rm_prompts", "rewards.rm_heldout",
                              "rewards.evaluation", "data") | inputs(cfg))


def sft(cfg: Config) -> Artefact:
    """π_sft's folder (only when ``models.sft`` is on); ``sft/training/`` holds its checkpoints."""
    return Artefact(_dir(cfg, "01_models") / "sft", "01_sft_and_reward", upstream(cfg))


def reward_model(cfg: Config) -> Artefact:
    return Artefact(_dir(cfg, "01_models") / "reward_model", "01_sft_and_reward", upstream(cfg))


def candidates(cfg: Config) -> Artefact:
    """D_t."""
    return Artefact(_dir(cfg, "02_candidates") / "candidates.parquet", "02_generate", upstream(cfg))


def training_seeds(cfg: Config) -> list[int]:
    """The training seeds (``training.seeds``, else ``run.seed``); the first is the main replicate."""
    return list(cfg.training.seeds) or [cfg.run.seed]


def replicate(cfg: Config, method: str, seed: int | None = None) -> str:
    """A trained policy's name: the method for the main replicate, ``<method>-seed<k>`` otherwise."""
    return method if seed is None or seed == training_seeds(cfg)[0] else f"{method}-seed{seed}"


def whitebox_task(cfg: Config) -> str:
    """The task whose white-box judgments CUT reads (``vcb_lib.judgments``): a registry task's name;
    your own data has none (``data:<name>``), so CUT there needs judgments from a model (training.cut_judge)."""
    task = task_of(cfg)
    return f"data:{task.name}" if task.source == "data" else task.name


def method_key(cfg: Config, method: str, seed: int | None = None) -> dict:
    """What training ``method`` with training seed ``seed`` (default: the main one) depends on: the
    upstream, every training key but the lists of methods and seeds and the other losses'
    hyper-parameters, the adapter's keys when ``training.lora`` applies to the method (none otherwise,
    so full fine-tuning's key is what it was), and, when the Fig. 5 curve is sampled during training,
    the evaluation keys that sampling uses."""
    online = is_online(method)
    lt = OnlineMethod(method) if online else LossType(method)
    own = lt.active_hparams(dataclasses.asdict(cfg.training))
    skip = ("methods", "seeds", "online", "lora") + (OFFLINE_ONLY_KEYS if online else ())
    training = [f"training.{f.name}" for f in dataclasses.fields(cfg.training)
                if f.name not in skip and (f.name not in LOSS_HPARAMS or f.name in own)]
    key = upstream(cfg) | cfg.slice(*training) | {"method": method, "seed": training_seeds(cfg)[0] if seed is None else seed}
    if online:  # the training.online keys this method reads, and no other: a GRPO option never retrains PPO
        key |= {f"training.online.{k}": getattr(cfg.training.online, k) for k in lt.online_keys}
    elif lt.judged:  # what wrote its judgments: edited templates retrain it
        from vcb_lib.judgments import judgments_fingerprint

        key |= {"judgments": judgments_fingerprint(whitebox_task(cfg), llm=bool(cfg.training.cut_judge))}
    lora = cfg.training.lora_for(method)
    if lora is not None:  # which other methods use adapters is not part of what this one computes
        key |= {f"training.lora.{k}": v for k, v in dataclasses.asdict(lora).items() if k not in ("enabled", "methods")}
    if cfg.evaluation.curve_points:
        key |= cfg.slice(*(f"evaluation.{k}" for k in CURVE_KEYS))
    return key


NAMED_IF_CHANGED = ("normalize", "eta", "sigma_floor", "sigma_policy",  # VCB's options: in the name only off the paper's default
                    "cut_positive")  # and CUT's positive context
ONLINE_NAMED_IF_CHANGED = ("kl_estimator", "loss_aggregation", "clip_level", "clip_low", "clip_high", "dual_clip",  # the peers'
                           "reward_clip", "entropy_coef", "critic_warmup_rounds")  # options: named only off their default
NEVER_NAMED = ("cut_judge", "cut_judge_model")  # a URL or a model path: CUT's folder says "llmjudge" instead


def method_dir_name(cfg: Config, method: str, seed: int | None = None) -> str:
    """Run folder of a method, named from what varies: ``vcb-gamma0.05-lam1.0-logsumexp-seed0``
    (``...-logsumexp-normalizerank-seed0`` when a VCB option leaves the paper's default); online
    methods add their KL coefficient, GRPO its ``scale_rewards`` and iterative VCB ``-refprevious``
    when it is REBEL-style (``ppo-kl0.05-seed0``, ``vcb_online-gamma0.05-lam1.0-logsumexp-seed0``); a
    method trained with LoRA adapters adds their rank (``dpo-gamma0.05-pairs-all-lora-r8-seed0``); CUT
    with judgments from a model (``training.cut_judge``) adds ``llmjudge``."""
    lt = OnlineMethod(method) if is_online(method) else LossType(method)
    seed = training_seeds(cfg)[0] if seed is None else seed
    defaults, active = type(cfg.training)(), lt.active_hparams(dataclasses.asdict(cfg.training))
    named = [k for k in active
             if k not in NEVER_NAMED and (k not in NAMED_IF_CHANGED or getattr(cfg.training, k) != getattr(defaults, k))]
    parts = [f"{k}{getattr(cfg.training, k)}".replace("reduction", "").replace("pairs", "pairs-").replace("cut_", "")
             for k in named]
    if "cut_judge" in active and cfg.training.cut_judge:
        parts.append("llmjudge")
    o = cfg.training.online
    if "kl_coef" in getattr(lt, "online_keys", ()) and lt is not OnlineMethod.VCB_ONLINE:
        parts.append(f"kl{o.kl_coef}")
    if lt is OnlineMethod.GRPO:
        parts.append(f"scale{o.scale_rewards}")
    if lt is OnlineMethod.VCB_ONLINE and o.reference != "sft":
        parts.append(f"ref{o.reference}")
    online_defaults = type(o)()
    parts += [f"{k.replace('_', '')}{getattr(o, k)}" for k in ONLINE_NAMED_IF_CHANGED
              if k in getattr(lt, "online_keys", ()) and getattr(o, k) != getattr(online_defaults, k)]
    lora = cfg.training.lora_for(method)
    if lora is not None:
        parts.append(f"lora-r{lora.r}")
    return "-".join([lt.value, *parts, f"seed{seed}"])


def method(cfg: Config, name: str, seed: int | None = None) -> Artefact:
    """``03_train/<method_dir_name>/``: final/ (the policy), log.jsonl, summary.json, curve/ (the
    upstream run's when it trained the method with the same key, :func:`shared`)."""
    return shared(cfg, Artefact(cfg.run_dir / "03_train" / method_dir_name(cfg, name, seed), "03_train",
                                method_key(cfg, name, seed), include=METHOD_FILES))


def sft_spec(cfg: Config) -> str:
    """Model spec of π_sft: this run's ``01_models/sft`` when ``models.sft`` is on (checked),
    else ``models.policy``."""
    if not cfg.models.sft:
        return cfg.models.policy
    return str(sft(cfg).require())


def policy_key(cfg: Config, policy: str) -> dict:
    return upstream(cfg) if policy == "sft" else method_key(cfg, policy)


def policy_specs(cfg: Config, policies: list[str] | None = None) -> dict[str, str]:
    """Evaluated policies (``policies``, default all): ``sft`` (π_sft) and each trained method's
    ``final/`` model (checked). A ``final/`` is always a whole transformers model, LoRA runs included
    (the adapters merged into its weights; the adapter itself in ``final/adapter/``), so every
    loader reads it as it is."""
    names = ["sft", *cfg.training.methods] if policies is None else policies
    return {p: sft_spec(cfg) if p == "sft" else str(method(cfg, p).require() / "final") for p in names}


def shared(cfg: Config, art: Artefact) -> Artefact:
    """No artefact's key says where a run writes, so a run that reads another run's upstream
    (``run.upstream``: sweep and panel points) uses that run's copy of an artefact when it is current
    there (same key, same freshness rule), else its own, built here as before. Read this way: π_sft's
    samples and the pool (drawn once in the upstream by ``ablations.share_sft_evaluation``, so every
    point is scored on the same candidates), and a method the upstream run already trained with the
    same key, with its samples and pool scores (a sweep's point at the base run's settings costs
    nothing). Only reading crosses folders: each run writes its own."""
    if not cfg.run.upstream:
        return art
    theirs = Artefact(cfg.upstream_dir / art.path.relative_to(cfg.run_dir), art.stage, art.key, art.include)
    return theirs if theirs.current() else art


def own(cfg: Config, art: Artefact) -> Artefact:
    """``art`` in this run's folder: what a stage builds when the artefact is not current. A copy
    :func:`shared` found current in the upstream run may have gone stale since (that run rebuilt
    it); the stage then builds this run's own, never writing into another run's folder."""
    if art.path.is_relative_to(cfg.run_dir):
        return art
    return Artefact(cfg.run_dir / art.path.relative_to(cfg.upstream_dir), art.stage, art.key, art.include)


def samples(cfg: Config, policy: str, split: str) -> Artefact:
    """``04_eval/<policy>/samples-<split>.parquet``: the policy's evaluation samples, scored (the
    upstream run's when current there, :func:`shared`)."""
    keys = ("num_prompts", "pool_prompts", "pool_max_new_tokens") if split == "test" else ("ood_prompts",)  # test: the pool's prompts and cap
    key = policy_key(cfg, policy) | cfg.slice(*(f"evaluation.{k}" for k in (*keys, *EVAL_SAMPLING_KEYS))) | \
        {"policy": policy, "split": split} | ({"sampling": "pool-prompts-T1"} if split == "test" else {})
    return shared(cfg, Artefact(cfg.run_dir / "04_eval" / policy / f"samples-{split}.parquet", "04_evaluate", key))


def eval_metrics(cfg: Config) -> Artefact:
    return Artefact(cfg.run_dir / "04_eval" / "metrics.json", "04_evaluate",
                    cfg.slice("run", "models", "sampling", "rewards", "data", "training", "evaluation") | inputs(cfg))


def pool(cfg: Config) -> Artefact:
    """``04_eval/pool/candidates.parquet``: the shared held-out pool drawn once from π_sft, scored
    by the reward model and the evaluation reward, with log π_sft (the upstream run's when current
    there, :func:`shared`)."""
    return shared(cfg, Artefact(cfg.run_dir / "04_eval" / "pool" / "candidates.parquet", "04_evaluate",
                                upstream(cfg) | cfg.slice(*(f"evaluation.{k}" for k in POOL_KEYS))))


def pool_scores(cfg: Config, method_name: str, seed: int | None = None) -> Artefact:
    """``04_eval/pool/<replicate>.parquet``: log π of every pool candidate under one trained policy."""
    name = replicate(cfg, method_name, seed)
    return shared(cfg, Artefact(cfg.run_dir / "04_eval" / "pool" / f"{name}.parquet", "04_evaluate",
                                method_key(cfg, method_name, seed) | cfg.slice(*(f"evaluation.{k}" for k in POOL_KEYS))
                                | {"policy": name}))
