"""Typed parameters for every stage of the workbench, loaded from ``params/*.yaml``.

One dataclass per stage. Each field is one annotated line with a trailing ``# comment``;
``python -m vcb_lib list-params`` prints those comments as the documentation. A YAML file holds
only what differs from these defaults::

    run:
      name: smoke
    training:
      gamma: 0.05

``load_params(path, overrides)`` rejects unknown keys (suggesting the closest valid key), wrong
types and out-of-range values with a message naming the file, the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vcb_lib.tasks import TASKS

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-6`` as a string; scientific notation is a number here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d+\.\d*|\.\d+)$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A parameter file or override is wrong; the message says where and what is allowed."""


def _require(ok: bool, key: str, message: str) -> None:
    """Range check used in ``__post_init__``: raise naming ``key`` when ``ok`` is false."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_judge(value: str, key: str, empty: str = "off") -> None:
    """A judge setting: empty (``empty`` says what that means), ``local`` or an http(s) URL with a host."""
    _require(value in ("", "local") or bool(re.fullmatch(r"https?://(\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+)(:\d+)?(/\S*)?", value)),
             key, f"must be empty ({empty}), local, or an http:// or https:// URL, got {value!r}")


def _at_most(value: int | float, limit: int | float, key: str, why: str) -> None:
    """Upper bound of a value that would exhaust the machine (memory, disk, time) past ``limit``."""
    _require(value <= limit, key, f"must be <= {limit:_}, got {value:_} ({why})")


# Every number in a config: floats finite and of sane magnitude, integers within int64 (torch, numpy).
MAX_FLOAT_MAGNITUDE = 1e12
MAX_INT_MAGNITUDE = 2 ** 63 - 1
MAX_PROMPTS = 10_000_000  # sampling/evaluation/rewards prompt counts (far above any dataset used here)
MAX_THEORY_CELLS = 100_000  # theory.n_instances * n_prompts * n_responses: the toy tables' size


# --------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------


UPSTREAM_STAGES = ("01_models", "02_candidates")  # what run.upstream shares between runs
RUN_LOCATION_KEYS = ("name", "output_root", "stages", "upstream", "threads")  # run.* keys left out of config hashes (where and how fast, not what)
# Keys that say where a run reports, not what it computes: left out of config hashes and slices, so
# switching the experiment tracker never makes an artefact stale.
REPORTING_KEYS = ("training.log_with",)
# training.log_with: accelerate's trackers (its LoggerType names but "all") or none.
Tracker = Literal["tensorboard", "none", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]
# training.* keys that the upstream stages use (SFT and reward-model training, bf16 reference pass);
# the loss hyper-parameters are not among them, so sweeping them reuses one upstream.
UPSTREAM_TRAINING_KEYS = ("batch_size", "grad_accum", "warmup_steps", "lr_schedule", "max_grad_norm", "weight_decay",
                          "bf16", "accelerate_config", "num_processes")


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = "default"  # run folder name: <output_root>/<name>/
    output_root: str = "outputs"  # folder holding run folders (not empty); relative paths are relative to the project root
    seed: int = 0  # seed for torch, numpy, random and the samplers
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto picks cuda when available
    stages: list[str] = field(default_factory=list)  # notebooks to run (stem or name, e.g. "00_theory" or "theory"); empty = all
    upstream: str = ""  # run folder (relative to output_root) whose 01_models/, 02_candidates/ this run reads; empty = its own
    threads: int = 0  # intra-op torch threads of the run's processes (notebook kernels, trainers, panel points); 0 = torch's default (all cores)

    def __post_init__(self) -> None:
        _require(bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.name)), "run.name",
                 f"{self.name!r} must be a folder name made of letters, digits, '.', '_' or '-'")
        _require(bool(self.output_root.strip()), "run.output_root",
                 f"must name a folder (e.g. outputs), got {self.output_root!r}")
        _require(self.seed >= 0, "run.seed", f"must be >= 0, got {self.seed}")
        _require(0 <= self.threads <= 1024, "run.threads", f"must be in 0..1024 (0 = torch's default), got {self.threads}")
        _require(self.upstream != self.name, "run.upstream", f"must be empty or another run's folder, not this run ({self.name!r})")


@dataclass
class TheoryConfig:
    """Notebook 00: Theorem 1 and the loss optima on tabular (finite-response) toy problems."""

    n_instances: int = 20  # random tabular problems checked against Theorem 1 (rows of one table); instances*prompts*responses <= 100_000
    n_prompts: int = 3  # prompts X per random problem
    n_responses: int = 5  # responses Y per prompt; <= 256 (the pairwise fits hold (X, Y, Y) tables)
    figure1_rewards: list[float] = field(default_factory=lambda: [0.1, 0.85, 0.9])  # Figure 1 example rewards r(x, y_1..y_3)
    figure1_ref_probs: list[float] = field(default_factory=list)  # π_sft over the Figure 1 responses (normalised); empty = uniform
    gamma: float = 1.0  # γ of Table 1 / Eq. 13 and of the toy losses (Eq. 9); 1.0 keeps Figure 1 readable (p3/p2 = e^{Δr/γσ})
    lam: float = 1.0  # λ, the logsumexp temperature of Eq. 20, in the toy VCB fits
    delta: float = 1.0  # SLiC hinge margin δ (Eq. 7) in the toy fits
    sft_weight: float = 1.0  # SLiC/RRHF cross-entropy weight in the toy fits (0 = ranking term only)
    fit_steps: int = 150  # Adam steps of the finite-budget toy fits (Figure 1, order-based methods)
    fit_lr: float = 0.1  # Adam learning rate of those fits
    tolerance: float = 1e-8  # max abs error allowed between closed form and numerical optimum
    fit_tolerance: float = 1e-6  # max abs error allowed between the converged VCB loss minimiser and Eq. 15 / Eq. 12

    def __post_init__(self) -> None:
        _require(self.n_instances >= 1, "theory.n_instances", f"must be >= 1, got {self.n_instances}")
        _require(self.n_prompts >= 1, "theory.n_prompts", f"must be >= 1, got {self.n_prompts}")
        _require(self.n_responses >= 2, "theory.n_responses", f"must be >= 2, got {self.n_responses}")
        _at_most(self.n_responses, 256, "theory.n_responses", "the pairwise fits hold (X, Y, Y) tables")
        cells = self.n_instances * self.n_prompts * self.n_responses
        _require(cells <= MAX_THEORY_CELLS, "theory.n_instances",
                 f"n_instances * n_prompts * n_responses must be <= {MAX_THEORY_CELLS:_}, got {self.n_instances} * "
                 f"{self.n_prompts} * {self.n_responses} = {cells:_} (notebook 00 fits every table to convergence)")
        _require(len(self.figure1_rewards) >= 2, "theory.figure1_rewards", "needs at least 2 rewards")
        _require(len(set(self.figure1_rewards)) > 1, "theory.figure1_rewards",
                 f"must not all be equal (σ_r = 0), got {self.figure1_rewards}")
        _require(not self.figure1_ref_probs or len(self.figure1_ref_probs) == len(self.figure1_rewards),
                 "theory.figure1_ref_probs", f"must be empty (uniform) or have one entry per reward "
                 f"({len(self.figure1_rewards)}), got {len(self.figure1_ref_probs)}")
        _require(all(p > 0 for p in self.figure1_ref_probs), "theory.figure1_ref_probs",
                 f"must be > 0, got {self.figure1_ref_probs}")
        for key in ("gamma", "lam", "fit_lr", "tolerance", "fit_tolerance"):
            value = getattr(self, key)
            _require(value > 0, f"theory.{key}", f"must be > 0, got {value}")
        for key in ("delta", "sft_weight"):
            value = getattr(self, key)
            _require(value >= 0, f"theory.{key}", f"must be >= 0, got {value}")
        _require(self.fit_steps >= 1, "theory.fit_steps", f"must be >= 1, got {self.fit_steps}")


@dataclass
class ModelsConfig:
    """Which language models play π_sft / π and how they are loaded."""

    policy: str = "tiny-random"  # model spec: local folder, hub id, packaged:smollm2-135m-instruct or tiny-random
    sft: bool = False  # run the SFT stage (MLE on SFT targets); off = models.policy is already π_sft
    sft_learning_rate: float = 1e-5  # SFT AdamW learning rate; <= 1.0
    sft_epochs: int = 1  # SFT epochs
    dtype: Literal["float32", "bfloat16"] = "float32"  # weight dtype when loading
    cache_dir: str = ".cache/models"  # converted/cached models; relative to the project root
    max_prompt_tokens: int = 256  # prompts are truncated from the left to this many tokens; <= 131072

    def __post_init__(self) -> None:
        _require(bool(self.policy), "models.policy", "must name a model spec")
        _require(self.sft_learning_rate > 0, "models.sft_learning_rate", f"must be > 0, got {self.sft_learning_rate}")
        _at_most(self.sft_learning_rate, 1.0, "models.sft_learning_rate", "larger is a typo, e.g. 5e6 for 5e-6")
        _require(self.sft_epochs >= 1, "models.sft_epochs", f"must be >= 1, got {self.sft_epochs}")
        _require(self.max_prompt_tokens > 0, "models.max_prompt_tokens", f"must be > 0, got {self.max_prompt_tokens}")
        _at_most(self.max_prompt_tokens, 131_072, "models.max_prompt_tokens", "longer than any supported context")


@dataclass
class SamplingConfig:
    """Step 2 of the pipeline (Sec. 4.3): n candidates per prompt from π_sft."""

    backend: Literal["auto", "hf", "vllm"] = "auto"  # auto = vLLM when importable, else HF generate
    n: int = 4  # candidates per prompt (n in Eq. 20); <= 1024
    temperature: float = 1.0  # sampling temperature (Fig. 6 ablates it)
    top_p: float = 1.0  # nucleus sampling mass
    max_new_tokens: int = 64  # generation length cap; <= 32768
    num_prompts: int = 0  # train prompts used to build D_t; 0 = all; <= 10_000_000
    batch_size: int = 8  # prompts per generate call (HF backend)

    def __post_init__(self) -> None:
        _require(self.n >= 2, "sampling.n", f"VCB needs at least 2 candidates per prompt, got {self.n}")
        _at_most(self.n, 1024, "sampling.n", "the pairwise losses hold n x n tables per prompt")
        _require(self.temperature > 0, "sampling.temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.max_new_tokens > 0, "sampling.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _at_most(self.max_new_tokens, 32_768, "sampling.max_new_tokens", "the KV cache and time grow with it")
        _require(self.num_prompts >= 0, "sampling.num_prompts", f"must be >= 0, got {self.num_prompts}")
        _at_most(self.num_prompts, MAX_PROMPTS, "sampling.num_prompts", "every candidate is kept on disk")
        _require(self.batch_size > 0, "sampling.batch_size", f"must be > 0, got {self.batch_size}")


@dataclass
class RewardsConfig:
    """The task, its gold reward, and the learned reward model (Eq. 18)."""

    task: str = "sentiment"  # a vcb_lib.tasks.TASKS name: embedded (sentiment, assistant, exact) or the paper's hub datasets (hh, tldr); a researcher's own prompts come through data.prompts instead
    reward_model: str = "learned"  # what scores D_t: learned (Bradley-Terry, Eq. 18), gold (the evaluation reward), or a reward spec: package.module:function or path/to/file.py:function (a batch of prompts and responses -> floats), judge:local or judge:<http(s) URL> (an LLM scoring with rewards.judge_rubric), or a folder / hub id of a sequence-classification reward model
    evaluation: str = ""  # the evaluation ("gold") reward: empty = the task's gold reward (own data: none, then the D_t reward evaluates); or a reward spec as reward_model takes
    judge_model: str = "packaged:smollm2-135m-instruct"  # judge:... rewards: the model the endpoint serves (a model spec for judge:local)
    judge_rubric: str = ""  # judge:... rewards: the rubric, a text file (relative to the project root) or the text itself, with {prompt} and {response}; the reply's last 'Score: N' is the reward; empty = a 0-10 helpfulness rubric
    rm_backbone: str = "policy"  # reward model body: policy (π_sft's decoder), minilm (packaged all-MiniLM-L6-v2 encoder), or an encoder folder
    rm_prompts: int = 128  # train prompts whose sampled pair (gold-labelled) trains the reward model; 0 = all; <= 10_000_000
    rm_heldout: float = 0.2  # share of those pairs held out for the accuracy of Table 4
    rm_learning_rate: float = 1e-4  # reward model AdamW learning rate; <= 1.0
    rm_epochs: int = 1  # reward model epochs

    def __post_init__(self) -> None:
        _require(self.task in TASKS, "rewards.task", f"unknown task {self.task!r}; allowed: {', '.join(TASKS)} "
                 "(your own prompts: data.prompts)")
        for key in ("reward_model", "evaluation"):
            value = getattr(self, key)
            _require(key == "evaluation" or bool(value.strip()), f"rewards.{key}", "must name a reward (learned, gold or a reward spec)")
            _require(not value.startswith("judge:") or value[len("judge:"):] == "local"
                     or bool(re.fullmatch(r"https?://\S+", value[len("judge:"):])), f"rewards.{key}",
                     f"a judge reward is judge:local or judge:<http(s) URL>, got {value!r}")
        _require(self.evaluation != "learned", "rewards.evaluation", "must be the task's gold (empty) or a reward spec, not "
                 "learned (the learned reward model is what is being evaluated)")
        _require(self.rm_prompts >= 0, "rewards.rm_prompts", f"must be >= 0, got {self.rm_prompts}")
        _at_most(self.rm_prompts, MAX_PROMPTS, "rewards.rm_prompts", "every pair is kept on disk")
        _require(0 < self.rm_heldout < 1, "rewards.rm_heldout", f"must be in (0, 1), got {self.rm_heldout}")
        _require(self.rm_learning_rate > 0, "rewards.rm_learning_rate", f"must be > 0, got {self.rm_learning_rate}")
        _at_most(self.rm_learning_rate, 1.0, "rewards.rm_learning_rate", "larger is a typo, e.g. 5e6 for 5e-6")
        _require(self.rm_epochs >= 1, "rewards.rm_epochs", f"must be >= 1, got {self.rm_epochs}")


@dataclass
class DataConfig:
    """A researcher's own data (README "Your own data"): prompts from a file or dataset, and scored candidates to import as D_t."""

    prompts: str = ""  # the task's prompts: a .jsonl/.json/.csv/.parquet file, a folder (datasets.save_to_disk, or of such files) or a datasets hub id (paths relative to the project root); empty = rewards.task's prompts (or, with data.candidates, the candidates' prompts)
    name: str = ""  # the task's name in reports and prompt ids; empty = the file's or dataset's name
    prompt_column: str = "prompt"  # column holding each prompt: text, or chat messages [{role, content}, ...] ending with the user's turn (UltraFeedback's candidates: instruction)
    system_column: str = ""  # optional column with a system prompt per row (wins over system_prompt)
    system_prompt: str = ""  # optional system prompt put before every prompt
    id_column: str = ""  # column with a stable prompt id; empty = prompt_id when the file has one, else a hash of the prompt
    split_column: str = ""  # column with each prompt's split (train, test or ood); empty = the split rule: the test_percent% of prompts with the smallest hash of (split_seed, prompt id) are test
    test_percent: int = 30  # the split rule's share of test prompts, 1..99
    split_seed: int = 0  # the split rule's seed
    hub_split: str = "train"  # the split read from a datasets hub id or a saved DatasetDict
    duplicates: Literal["drop", "error"] = "drop"  # a prompt given twice: keep its first row (counted in the log) or refuse the file
    candidates: str = ""  # scored candidates to import as D_t instead of sampling (stage 02): a file or folder as data.prompts takes, one of the candidate schemas below
    candidates_format: Literal["auto", "flat", "groups", "ultrafeedback"] = "auto"  # flat: a row per candidate (prompt, response, reward); groups: a row per prompt (prompt, completions, rewards: the workbench's trl-groups export); ultrafeedback: instruction, completions [{response, overall_score}]; auto = by the columns
    response_column: str = "response"  # flat candidates: the response column
    reward_column: str = "reward"  # flat candidates: the reward column (groups: rewards; ultrafeedback: overall_score); absent = scored by rewards.reward_model

    def __post_init__(self) -> None:
        _require(1 <= self.test_percent <= 99, "data.test_percent", f"must be in 1..99, got {self.test_percent}")
        _require(self.split_seed >= 0, "data.split_seed", f"must be >= 0, got {self.split_seed}")
        _require(bool(self.prompt_column.strip()), "data.prompt_column", "must name a column")
        _require(not self.name or bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.name)), "data.name",
                 f"{self.name!r} must be made of letters, digits, '.', '_' or '-'")

    @property
    def own(self) -> bool:
        """Whether the task is the researcher's data rather than a registry task."""
        return bool(self.prompts or self.candidates)


def methods() -> tuple[str, ...]:
    """The methods notebook 03 trains: ``LossType``'s members that train a policy on D_t, then the
    on-policy methods of ``policy_gradient.OnlineMethod`` (rounds of rollouts, ``training.online``)."""
    from vcb_lib.losses import LossType  # torch: imported only when a config is validated
    from vcb_lib.policy_gradient import OnlineMethod

    return tuple(m.value for m in LossType if m.trains_policy) + tuple(m.value for m in OnlineMethod)


@dataclass
class OnlineConfig:
    """training.online: the on-policy methods (ppo, rloo, grpo, vcb_online), trained in rounds: sample from the current policy, score, update."""

    rounds: int = 4  # rounds of sample -> score -> update (each resumable); 1..100_000
    prompts_per_round: int = 8  # train prompts per round: a seeded cycle through the prompts D_t uses (sampling.num_prompts); <= 10_000_000
    n: int = 4  # responses per prompt and round (RLOO's leave-one-out group, GRPO's group, VCB's pairs: >= 2; ppo: >= 1); <= 1024
    temperature: float = 1.0  # rollout sampling temperature (top_p 1); ppo/rloo/grpo compute log-probs of logits / temperature (Huang et al. 2024)
    max_new_tokens: int = 0  # rollout length cap; 0 = sampling.max_new_tokens; <= 32768
    epochs: int = 1  # passes over each round's rollouts (TRL num_ppo_epochs; GRPO's num_iterations μ); 1..64
    minibatches: int = 1  # optimizer steps per pass: the round's prompts split evenly (TRL num_mini_batches); <= prompts_per_round
    kl_coef: float = 0.05  # β of the KL to π_sft: ppo per-token penalty in the reward (TRL kl_coef), rloo sequence KL in the reward, grpo k3 loss term (TRL beta); vcb_online: unused (γ)
    clip: float = 0.2  # ε of the importance-ratio clip (ppo, rloo, grpo; TRL cliprange / epsilon); (0, 10]
    vf_coef: float = 0.1  # ppo: weight of the value loss (TRL vf_coef)
    clip_value: float = 0.2  # ppo: clip of the value update (TRL cliprange_value); (0, 1e6]
    gae_gamma: float = 1.0  # ppo: GAE discount γ (TRL gamma); [0, 1]
    gae_lambda: float = 0.95  # ppo: GAE λ (TRL lam); [0, 1]
    whiten_rewards: bool = False  # ppo: whiten the per-token rewards (mean kept) before GAE (TRL whiten_rewards); advantages are always whitened
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response cut at max_new_tokens without EOS (TRL missing_eos_penalty); 0 = off
    scale_rewards: Literal["group", "batch", "none"] = "group"  # grpo: centred rewards / the group's std, the batch's, or not scaled (TRL scale_rewards)
    reference: Literal["sft", "previous"] = "sft"  # vcb_online: Δπ = log π - log π_sft (anchored), or log π - log π_previous round (REBEL-style)
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = "auto"  # ppo, rloo, grpo: Schulman's KL(π‖π_sft) estimate, d = log π_sft - log π: k1 = -d, k2 = d²/2, k3 = e^d - d - 1 (OpenRLHF, verl, TRL kl_estimator); auto = each method's own default (ppo, rloo: k1 in the reward, as TRL; grpo: k3 in the loss, as the GRPO paper and TRL)
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"  # ppo, rloo, grpo: a minibatch's per-token losses / its token count (TRL, DAPO, verl), or the mean over responses of each one's token mean (GRPO paper), or / (responses × the rollout length cap) (Dr. GRPO)
    clip_level: Literal["sequence", "token"] = "sequence"  # rloo: sequence = one importance ratio per response, exp(Σ_t Δlog π), clipped once (the default: TRL RLOOTrainer's rule); token = one per token, as PPO (the workbench's rule before issue 31)
    clip_low: float = 0.0  # ppo, rloo, grpo: ε_low, the ratio's lower clip 1 - ε_low (DAPO clip-higher; TRL epsilon); 0 = clip; [0, 1)
    clip_high: float = 0.0  # ppo, rloo, grpo: ε_high, the ratio's upper clip 1 + ε_high (DAPO's 0.28; TRL epsilon_high); 0 = clip; [0, 10]
    dual_clip: float = 0.0  # ppo, rloo, grpo: verl's dual clip c > 1, the loss of a negative advantage capped at -c·A; 0 = off, TRL's and the workbench's rule (verl's default is 3)
    reward_clip: float = 0.0  # ppo, rloo, grpo: scores clipped to [-c, c] before the advantages (OpenRLHF reward_clip_range); 0 = off
    entropy_coef: float = 0.0  # ppo, rloo, grpo: entropy bonus, coef × the per-token entropy of π subtracted from the loss (verl entropy_coeff); 0 = off
    critic_warmup_rounds: int = 0  # ppo: the first k rounds update only the value network (the policy keeps its weights; verl critic_warmup); 0 = off; < rounds

    def __post_init__(self) -> None:
        key = "training.online."
        _require(1 <= self.rounds <= 100_000, key + "rounds", f"must be in 1..100000, got {self.rounds}")
        _require(self.prompts_per_round >= 1, key + "prompts_per_round", f"must be >= 1, got {self.prompts_per_round}")
        _at_most(self.prompts_per_round, MAX_PROMPTS, key + "prompts_per_round", "every rollout is kept on disk")
        _require(1 <= self.n <= 1024, key + "n", f"must be in 1..1024, got {self.n}")
        _require(self.temperature > 0, key + "temperature", f"must be > 0, got {self.temperature}")
        _require(0 <= self.max_new_tokens <= 32_768, key + "max_new_tokens", f"must be in 0..32768, got {self.max_new_tokens}")
        _require(1 <= self.epochs <= 64, key + "epochs", f"must be in 1..64, got {self.epochs}")
        _require(1 <= self.minibatches <= self.prompts_per_round, key + "minibatches",
                 f"must be in 1..prompts_per_round ({self.prompts_per_round}): each minibatch holds >= 1 prompt, got {self.minibatches}")
        _require(0 < self.clip <= 10, key + "clip", f"must be in (0, 10], got {self.clip}")
        _require(0 < self.clip_value <= 1e6, key + "clip_value", f"must be in (0, 1e6], got {self.clip_value}")
        for name in ("kl_coef", "vf_coef", "missing_eos_penalty"):
            _require(getattr(self, name) >= 0, key + name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("gae_gamma", "gae_lambda"):
            _require(0 <= getattr(self, name) <= 1, key + name, f"must be in [0, 1], got {getattr(self, name)}")
        _require(0 <= self.clip_low < 1, key + "clip_low", f"must be in [0, 1) (0 = clip), got {self.clip_low}")
        _require(0 <= self.clip_high <= 10, key + "clip_high", f"must be in [0, 10] (0 = clip), got {self.clip_high}")
        _require(self.dual_clip == 0 or 1 < self.dual_clip <= 1e6, key + "dual_clip",
                 f"must be 0 (off) or in (1, 1e6], got {self.dual_clip}")
        for name in ("reward_clip", "entropy_coef"):
            _require(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, key + name,
                     f"must be a finite number >= 0, got {getattr(self, name)}")
        _require(0 <= self.critic_warmup_rounds < self.rounds, key + "critic_warmup_rounds",
                 f"must be in 0..rounds-1 ({self.rounds - 1}): the policy trains after the warm-up, got {self.critic_warmup_rounds}")


@dataclass
class LoraConfig:
    """training.lora: LoRA adapters (peft) on π_sft for the offline methods; only the adapters train, final/ holds the merged policy."""

    enabled: bool = False  # train LoRA adapters (peft) instead of every weight; false = full fine-tuning
    r: int = 8  # adapter rank (peft r); 1..4096
    alpha: int = 16  # the update is scaled by alpha / r (peft lora_alpha); >= 1
    dropout: float = 0.0  # dropout on the adapters' input (peft lora_dropout); [0, 1)
    target_modules: list[str] = field(default_factory=list)  # names (or dotted suffixes) of the layers that get adapters, e.g. [q_proj, v_proj]; [all-linear] = every linear layer but the LM head; empty = peft's default for the architecture (Llama: q_proj, v_proj; GPT-NeoX: query_key_value)
    methods: list[str] = field(default_factory=list)  # methods trained with adapters; empty = every method in training.methods; a name not in training.methods is ignored (a sweep may narrow them); never an on-policy method

    def __post_init__(self) -> None:
        from vcb_lib.policy_gradient import OnlineMethod

        key = "training.lora."
        _require(1 <= self.r <= 4096, key + "r", f"must be in 1..4096, got {self.r}")
        _require(self.alpha >= 1, key + "alpha", f"must be >= 1, got {self.alpha}")
        _require(0 <= self.dropout < 1, key + "dropout", f"must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.target_modules if not re.fullmatch(r"[\w.-]+", t)]
        _require(not bad, key + "target_modules", f"{bad} are not module names (letters, digits, _ . -), e.g. [q_proj, v_proj]")
        _require("all-linear" not in self.target_modules or self.target_modules == ["all-linear"], key + "target_modules",
                 f"all-linear stands alone (it names every linear layer but the LM head), got {self.target_modules}")
        offline = [m for m in methods() if m not in {o.value for o in OnlineMethod}]
        unknown = [m for m in self.methods if m not in offline]
        _require(not unknown, key + "methods", f"{unknown} cannot train adapters; allowed: {offline} (the on-policy "
                 "methods train every weight)")


@dataclass
class TrainingConfig:
    """Step 3 (Sec. 4.3): calibration training of π on D_t; hyper-parameters of every loss."""

    methods: list[str] = field(default_factory=lambda: ["vcb", "dpo", "ipo", "slic", "rrhf", "rest"])  # losses to train, one run each
    seeds: list[int] = field(default_factory=list)  # training seeds: each method trains once per seed on the same D_t; empty = [run.seed]; the first is the main replicate (sampled evaluation, Fig. 5), the pool scores all; <= 16
    gamma: float = 0.05  # γ, Eq. 9 (DPO's β, IPO's target is γ⁻¹/2)
    lam: float = 1.0  # λ, the logsumexp temperature of Eq. 20
    reduction: Literal["logsumexp", "mean", "max"] = "logsumexp"  # VCB aggregation over pairs; mean = the "w/o" ablation; max = the hardest pair (λ -> 0)
    normalize: Literal["prompt_std", "batch_std", "none", "rank"] = "prompt_std"  # VCB reward scale: prompt_std = Eq. 10's σ_r(x); batch_std = one σ per micro-batch; none = fixed eta (NeMo-Aligner's rpo_sq); rank = centred ranks (value-free control)
    eta: float = 1.0  # VCB normalize=none: fixed reward scale η (rpo_sq's gt_reward_scale); > 0
    sigma_floor: float = 0.0  # VCB: prompts whose σ_r(x) is below this are floored or dropped (sigma_policy); 0 = Eq. 10 as is
    sigma_policy: Literal["floor", "drop"] = "floor"  # VCB: floor = divide by max(σ, sigma_floor) (prompt_std, batch_std); drop = loss 0 for those prompts
    alpha: float = 1.0  # InfoNCA / NCA: temperature α of the softmax(r/α) targets (arXiv 2402.05369); > 0
    value_gamma: float = 1.0  # A*-PO (a2po): γ' of V̂(x) = γ' log mean exp(r/γ') (the paper's β1; γ is its β2); > 0
    offset_scale: float = 1.0  # ODPO: α of the offset α·log(r_w - r_l) (arXiv 2402.10571); 0 = DPO
    cut_alpha: float = 1.0  # CUT (arXiv 2312.14591): α, weight of the unlikelihood term -log(1 - p) on detected tokens (the official README's 1); >= 0
    cut_lambda: float = 1.1  # CUT: λ, a token is inappropriate when p(y_t | x, negative judgment) / p(y_t | positive context) > λ (official threshold 1.1); > 0
    cut_positive: Literal["none", "judgment"] = "none"  # CUT's positive context (Align-P, Misalign): none = the instruction alone, the paper's code and the evaluation template; judgment = the instruction with the positive judgment
    cut_judge: str = ""  # CUT's judgments: empty = the task's white-box features (vcb_lib/judgments.yaml); a URL of an OpenAI-compatible endpoint, or local (vLLM's server on 127.0.0.1 while D_t is judged): critiques written by that model (the paper's setting; judgments.LLMJudgments)
    cut_judge_model: str = ""  # with a URL: the model name sent to it; with local: the model spec served (folder, hub id, packaged:<name>), empty = packaged:smollm2-135m-instruct (a weak critic)
    delta: float = 1.0  # SLiC hinge margin δ, Eq. 7
    sft_weight: float = 1.0  # cross-entropy regulariser weight for SLiC and RRHF
    length_penalty: float = 1.0  # RRHF scores are log π / n_tokens^length_penalty
    top_k: int = 1  # ReST: responses per prompt kept (highest reward) for the NLL
    pairs: Literal["all", "best_worst"] = "all"  # preference pairs for order-based losses; CUT: every candidate, or each prompt's best and worst by reward
    learning_rate: float = 5e-6  # AdamW peak learning rate; <= 1.0
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 4  # prompts per optimizer micro-batch (each with n candidates)
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 10  # linear warm-up steps
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    max_grad_norm: float = 1.0  # gradient clipping
    epochs: int = 1  # passes over D_t
    max_steps: int = 0  # stop after this many optimizer steps; 0 = no limit
    bf16: bool = False  # bf16 autocast (CPU and GPU)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    save_every: int = 0  # resumable checkpoint (model, optimizer, RNG, data position) every K steps and at the end; 0 = none (final/ only)
    accelerate_config: str = "params/accelerate/single.yaml"  # accelerate launch config
    num_processes: int = 1  # processes for accelerate launch
    log_with: Tracker = "tensorboard"  # experiment tracker of every training (accelerate's log_with; the same metrics as log.jsonl): tensorboard writes offline to <run>/tensorboard/; none = log.jsonl only
    online: OnlineConfig = field(default_factory=OnlineConfig)  # the on-policy methods' rounds (ppo, rloo, grpo, vcb_online): training.online.<key>, listed below
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters instead of full fine-tuning (peft; off by default): training.lora.<key>, listed below

    def __post_init__(self) -> None:
        _require(len(self.seeds) <= 16 and len(set(self.seeds)) == len(self.seeds) and all(x >= 0 for x in self.seeds),
                 "training.seeds", f"must be at most 16 distinct seeds >= 0, got {self.seeds}")
        bad = [m for m in self.methods if m not in methods()]
        _require(not bad, "training.methods", f"unknown method(s) {bad}; allowed: {list(methods())}")
        grouped = [m for m in self.methods if m in ("rloo", "grpo", "vcb_online")]
        _require(not grouped or self.online.n >= 2, "training.online.n",
                 f"{grouped} compare a prompt's samples with each other: n must be >= 2, got {self.online.n}")
        for key in ("gamma", "lam", "learning_rate", "max_grad_norm", "eta", "alpha", "value_gamma", "cut_lambda"):
            value = getattr(self, key)
            _require(value > 0, f"training.{key}", f"must be > 0, got {value}")
        _at_most(self.learning_rate, 1.0, "training.learning_rate", "larger is a typo, e.g. 5e6 for 5e-6")
        for key in ("delta", "sft_weight", "length_penalty", "weight_decay", "warmup_steps", "max_steps", "save_every",
                    "sigma_floor", "offset_scale", "cut_alpha"):
            value = getattr(self, key)
            _require(value >= 0, f"training.{key}", f"must be >= 0, got {value}")
        _require(not (self.sigma_floor > 0 and self.sigma_policy == "floor" and self.normalize in ("none", "rank")),
                 "training.sigma_floor", f"{self.sigma_floor} with sigma_policy floor floors the σ that normalize divides "
                 f"by, and normalize {self.normalize!r} divides by none; use normalize prompt_std or batch_std, or "
                 "sigma_policy drop")
        for key in ("batch_size", "grad_accum", "epochs", "num_processes", "top_k"):
            value = getattr(self, key)
            _require(value >= 1, f"training.{key}", f"must be >= 1, got {value}")
        _check_judge(self.cut_judge, "training.cut_judge", "the white-box judgments")
        _require(not (self.cut_judge.startswith("http") and not self.cut_judge_model), "training.cut_judge_model",
                 f"is empty but training.cut_judge is a URL ({self.cut_judge}): name the model it serves")
        if self.lora.enabled and not self.lora.methods:
            from vcb_lib.policy_gradient import OnlineMethod

            online = [m for m in self.methods if m in {o.value for o in OnlineMethod}]
            _require(not online, "training.lora.methods", f"is empty, so adapters would train every method in "
                     f"training.methods, but the on-policy methods {online} train every weight: name the methods to "
                     f"adapt, e.g. [{next((m for m in self.methods if m not in online), 'dpo')}]")

    def lora_for(self, method: str) -> LoraConfig | None:
        """``training.lora`` where it applies to ``method`` (enabled, and ``method`` in its ``methods``
        or that list empty), else None: the one rule the trainer, the artefact key and the folder name read."""
        lora = self.lora
        return lora if lora.enabled and (not lora.methods or method in lora.methods) else None


@dataclass
class EvaluationConfig:
    """Notebooks 04-05: win rates, reward vs KL, misalignment, diversity, length, OOD."""

    num_prompts: int = 0  # test prompts every policy samples on-policy: the first num_prompts of the pool's prompts (evaluation.pool_prompts), at the pool's length cap, T = 1, top_p 1 (the pool's check, Table 2, Fig. 5); 0 = all of them; <= 10_000_000
    ood_prompts: int = 0  # out-of-distribution prompts evaluated (Table 5); 0 = all; <= 10_000_000
    samples_per_prompt: int = 2  # samples per prompt and policy (pairs for misalignment and Self-BLEU; A.5/A.8 use 8); <= 1024
    temperature: float = 1.0  # sampling temperature of the OOD samples and the Fig. 5 snapshots (the test samples use 1, as the pool)
    max_new_tokens: int = 64  # length cap of the OOD samples, the snapshots and the pool when pool_max_new_tokens is 0; <= 32768
    bootstrap: int = 1000  # bootstrap resamples for confidence intervals; <= 1_000_000
    curve_points: int = 0  # Fig. 5: snapshots sampled during training (evenly spaced steps; π_sft and the final model come from the evaluation); 0 = none
    curve_prompts: int = 8  # Fig. 5: test prompts sampled at each snapshot (the first ones)
    judge: str = ""  # LLM judge (A.3, Fig. 4): the URL of an OpenAI-compatible endpoint, local (vLLM's server started on 127.0.0.1 for the run; needs vLLM), or empty = off
    judge_model: str = ""  # with a URL: the model name sent to it; with local: the model spec served (folder, hub id, packaged:<name>), empty = packaged:smollm2-135m-instruct (a weak judge)
    judge_workers: int = 4  # judge requests in flight at once (a vLLM server batches them); 1 = one at a time; <= 256
    judge_start_timeout: int = 600  # local: seconds the server may take to answer /health (loading a large model takes minutes)
    pool_prompts: int = 0  # shared held-out pool: test prompts whose candidates every policy scores; 0 = all; <= 10_000_000
    pool_candidates: int = 8  # m candidates per pool prompt, drawn once from π_sft at T = 1, top_p = 1 (what importance weights need); 2..1024
    pool_max_new_tokens: int = 0  # length cap of the pool's candidates; 0 = evaluation.max_new_tokens

    def __post_init__(self) -> None:
        _require(2 <= self.pool_candidates <= 1024, "evaluation.pool_candidates",
                 f"must be in 2..1024 (pairs are needed; every policy scores them all), got {self.pool_candidates}")
        _require(self.pool_prompts >= 0, "evaluation.pool_prompts", f"must be >= 0, got {self.pool_prompts}")
        _at_most(self.pool_prompts, MAX_PROMPTS, "evaluation.pool_prompts", "every candidate is kept on disk")
        _require(0 <= self.pool_max_new_tokens <= 32_768, "evaluation.pool_max_new_tokens",
                 f"must be in 0..32768, got {self.pool_max_new_tokens}")
        for key in ("max_new_tokens", "bootstrap"):
            value = getattr(self, key)
            _require(value >= 1, f"evaluation.{key}", f"must be >= 1, got {value}")
        _require(self.samples_per_prompt >= 2, "evaluation.samples_per_prompt", f"must be >= 2, got {self.samples_per_prompt}")
        _at_most(self.samples_per_prompt, 1024, "evaluation.samples_per_prompt", "Self-BLEU scores k x (k - 1) pairs per prompt")
        _at_most(self.max_new_tokens, 32_768, "evaluation.max_new_tokens", "the KV cache and time grow with it")
        _at_most(self.bootstrap, 1_000_000, "evaluation.bootstrap", "each resample redraws every prompt")
        for key in ("num_prompts", "ood_prompts"):
            _at_most(getattr(self, key), MAX_PROMPTS, f"evaluation.{key}", "every sample is kept on disk")
        for key in ("num_prompts", "ood_prompts", "curve_points"):
            value = getattr(self, key)
            _require(value >= 0, f"evaluation.{key}", f"must be >= 0, got {value}")
        _require(self.curve_prompts >= 1, "evaluation.curve_prompts", f"must be >= 1, got {self.curve_prompts}")
        _require(self.temperature > 0, "evaluation.temperature", f"must be > 0, got {self.temperature}")
        _check_judge(self.judge, "evaluation.judge")
        _require(1 <= self.judge_workers <= 256, "evaluation.judge_workers", f"must be in 1..256, got {self.judge_workers}")
        _require(self.judge_start_timeout >= 1, "evaluation.judge_start_timeout",
                 f"must be >= 1, got {self.judge_start_timeout}")


@dataclass
class AblationConfig:
    """Notebook 06: the widget panel and the sweep read-back."""

    interactive: bool = True  # show the ipywidgets panel (the runner turns it off)
    sweeps: list[str] = field(default_factory=list)  # sweep files (params/sweeps/*.yaml) notebook 06 runs (finished points skipped) and plots

    def __post_init__(self) -> None:
        missing = [s for s in self.sweeps if not resolve_path(s).is_file()]
        _require(not missing, "ablation.sweeps", f"sweep file(s) not found: {missing} (paths are relative to the project root)")


@dataclass
class Config:
    """All stages. ``cfg.<stage>.<key>``; ``cfg.run_dir`` is where this run writes."""

    run: RunConfig = field(default_factory=RunConfig)
    theory: TheoryConfig = field(default_factory=TheoryConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    source: str = field(default="<defaults>", compare=False, repr=False)  # file the values came from

    def __post_init__(self) -> None:
        if self.data.own:  # the researcher's task: no gold reward unless rewards.evaluation names one
            _require(self.rewards.reward_model != "gold" or bool(self.rewards.evaluation), "rewards.reward_model",
                     "gold scores D_t with the evaluation reward, and your own data has none: set rewards.evaluation, or "
                     "name the reward that scores D_t (package.module:function, path/to/file.py:function, judge:local, "
                     "a reward-model folder or hub id)")
            needs_pairs = [k for k, on in (("rewards.reward_model: learned", self.rewards.reward_model == "learned"),
                                           ("models.sft: true", self.models.sft)) if on]
            _require(not needs_pairs or bool(self.rewards.evaluation), needs_pairs[0] if needs_pairs else "",
                     "labels sampled pairs with the evaluation reward, and your own data has none: set rewards.evaluation "
                     "to a reward spec, or score D_t with one (rewards.reward_model)")
        elif TASKS[self.rewards.task].exact:  # every response is enumerated: |V|^L under the cap, checked before any stage
            from vcb_lib.tasks.exact import check_space, space

            try:
                check_space(len(space().vocabulary), self.sampling.max_new_tokens)
            except ValueError as err:
                raise ConfigError(f"sampling.max_new_tokens: {err}") from None

    @property
    def run_dir(self) -> Path:
        return resolve_path(self.run.output_root) / self.run.name

    @property
    def upstream_dir(self) -> Path:
        """The run folder holding π_sft, the reward model and D_t: ``run.upstream``'s when set, else this run's."""
        return (resolve_path(self.run.output_root) / self.run.upstream).resolve() if self.run.upstream else self.run_dir

    def stage_dir(self, stage: str, *, create: bool = True) -> Path:
        """``<run_dir>/<stage>``, created if missing. With ``run.upstream`` set, the upstream
        stages (``01_models``, ``02_candidates``) are the upstream run's."""
        path = (self.upstream_dir if stage in UPSTREAM_STAGES else self.run_dir) / stage
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def to_dict(self) -> dict[str, Any]:
        return {s.name: dataclasses.asdict(getattr(self, s.name)) for s in _sections()}

    def hash(self, *sections: str) -> str:
        """Short hash of the given sections (all when none): stages compare it to decide whether
        their outputs are current."""
        data = self.to_dict()
        unknown = [s for s in sections if s not in data]
        if unknown:
            raise KeyError(f"unknown config section(s) {unknown}; allowed: {list(data)}")
        picked = {s: data[s] for s in (sections or data)}
        if "run" in picked:  # where a run writes does not change what it computes
            picked["run"] = {k: v for k, v in picked["run"].items() if k not in RUN_LOCATION_KEYS}
        for key in REPORTING_KEYS:  # nor where it reports
            section, _, name = key.partition(".")
            picked.get(section, {}).pop(name, None)
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]

    def slice(self, *keys: str) -> dict[str, Any]:
        """The config slice an artefact depends on, flat: ``{"sampling.n": 4, ...}``. Each key
        names a whole section (``"sampling"``) or one field (``"training.batch_size"``); where a
        run writes (``RUN_LOCATION_KEYS``) or reports (``REPORTING_KEYS``) is never part of it."""
        data, out = self.to_dict(), {}
        for key in keys:
            section, _, name = key.partition(".")
            if section not in data or (name and name not in data[section]):
                raise KeyError(f"unknown config key {key!r}; sections: {list(data)}")
            names = [name] if name else [n for n in data[section] if not (section == "run" and n in RUN_LOCATION_KEYS)]
            out.update({f"{section}.{n}": data[section][n] for n in names if f"{section}.{n}" not in REPORTING_KEYS})
        return out

    def save(self, path: Path | None = None) -> Path:
        """Write the resolved config (with its hash) to ``<run_dir>/config.yaml`` atomically."""
        from vcb_lib.io import atomic_write_text

        path = path or self.run_dir / "config.yaml"
        text = f"# resolved from {self.source}; hash {self.hash()}\n" + yaml.safe_dump(self.to_dict(), sort_keys=False)
        atomic_write_text(path, text)
        return path


def resolve_path(path: str | Path) -> Path:
    """Relative paths in params files are relative to the project root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]


def field_docs(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field line in ``cls``'s source."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*?#\s*(.*)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}.get(tp, str(tp))


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float only) or raise naming ``key``."""
    origin = typing.get_origin(tp)
    ok = False
    if dataclasses.is_dataclass(tp):  # a nested section, e.g. training.online
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return _build_section(tp, value, key, "")
    elif origin is Literal:
        ok = value in typing.get_args(tp)
    elif origin is list:
        if isinstance(value, list):
            return [_check_type(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                pass
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = _check_float(value, key) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        value = _check_int(value, key) if ok else value
    elif tp is type(None):
        ok = value is None
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _check_float(value: int | float, key: str) -> float:
    """``value`` as a float, or raise naming ``key`` on inf/NaN and magnitudes beyond
    ``MAX_FLOAT_MAGNITUDE``: ``gamma: .inf`` would pass ``> 0`` and make every loss NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if abs(value) > MAX_FLOAT_MAGNITUDE:
        shown = f"{value:g}" if isinstance(value, float) else _int_text(value)
        raise ConfigError(f"{key}: must be a finite number of magnitude <= {MAX_FLOAT_MAGNITUDE:g}, got {shown}")
    return float(value)


def _check_int(value: int, key: str) -> int:
    """``value``, or raise naming ``key`` beyond int64 (what torch and numpy take)."""
    if abs(value) > MAX_INT_MAGNITUDE:
        raise ConfigError(f"{key}: must be within ±{MAX_INT_MAGNITUDE} (int64), got {_int_text(value)}")
    return value


def _int_text(value: int) -> str:
    return str(value) if value.bit_length() < 128 else f"an integer of {value.bit_length()} bits"


def _unknown_key(key: str, allowed: list[str]) -> ConfigError:
    """Name the closest allowed key, then list the allowed keys of the same section (or the
    sections, when the section itself is unknown)."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    prefix = key.rpartition(".")[0] + "."  # the keys beside it: a section's, or a nested section's (training.online.)
    same = [a for a in allowed if a.startswith(prefix) and "." not in a[len(prefix):]] or \
        sorted({a.partition(".")[0] for a in allowed})
    return ConfigError(f"unknown key '{key}'.{hint} Allowed: {', '.join(same)}")


def _build_section(cls: type, raw: dict[str, Any], section: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(f"{section}.{key}", [f"{section}.{n}" for n in names])
        kwargs[key] = _check_type(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _keys(cls: type, prefix: str) -> list[str]:
    """Every key a section takes, nested sections' keys included (``training.online.rounds``)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out.append(f"{prefix}.{f.name}")
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], f"{prefix}.{f.name}")
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.gamma=0.1"`` -> ``("training.gamma", 0.1)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. training.gamma=0.1")
    key, value = text.split("=", 1)
    return key.strip(), _yaml(value) if value.strip() else ""


def _override_list(text: str) -> list[str]:
    """Overrides given as one string, as papermill passes ``-p overrides '["k=v"]'``: a YAML list
    of ``section.key=value`` strings (iterating the string would give its characters)."""
    allowed = ("overrides given as a string must be a YAML list of 'section.key=value' strings, "
               "e.g. '[\"training.gamma=0.1\"]' ('[]' for none)")
    try:
        items = _yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{allowed}; {text!r} is not valid YAML: {err}") from None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{allowed}, got {text!r}")
    return items


def load_params(path: str | Path | None = None, overrides: list[str] | str | dict[str, Any] | None = None) -> Config:
    """Read a params YAML file (None = defaults only), apply ``section.key=value`` overrides,
    validate types and ranges, and return the resolved ``Config``.

    ``overrides``: a list of ``section.key=value`` strings, a ``{key: value}`` dict, or one string
    holding a YAML list of them (papermill's ``-p overrides '["training.gamma=0.1"]'``).
    Raises ``ConfigError`` naming the file (or override), the key and the allowed keys/values.
    """
    if isinstance(overrides, str):
        overrides = _override_list(overrides)
    where = "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path).expanduser().resolve()
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"params file not found: {path}")
        try:
            raw = _yaml(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:  # a binary file, or text in another encoding
            raise ConfigError(f"{where} is not a params file: expected UTF-8 YAML text (a mapping of sections run:, "
                              f"training:, ...), but byte {err.start} is not UTF-8 ({err.reason})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{where} is not valid YAML: {err}") from None
        if raw is None or raw == {}:  # empty, blank, comments only, or "{}"
            raise ConfigError(f"{where} is empty: a params file names at least one section (run:, training:, ...); "
                              "to run the defaults use params/default.yaml (the embedded default run), or name one "
                              "section to keep every built-in default, e.g. 'run: {name: mine}'")
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping of sections (run:, training:, ...), got {type(raw).__name__}")
    sections = {f.name: f.default_factory for f in _sections()}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"{_unknown_key(name, list(sections))} (in {where})")
        if not isinstance(value, dict):
            raise ConfigError(f"{name} in {where} must be a mapping of keys, got {value!r}")
    raw = {name: dict(raw.get(name) or {}) for name in sections}

    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    all_keys = [k for s, cls in sections.items() for k in _keys(cls, s)]
    for key, value in items:
        if key not in all_keys:
            raise ConfigError(f"{_unknown_key(key, all_keys)} (in override {key}={value!r})")
        section, _, name = key.partition(".")
        inner, _, leaf = name.partition(".")
        if not leaf:
            raw[section][name] = value
        elif isinstance(raw[section].setdefault(inner, {}), dict):  # a nested section's key: training.online.rounds
            raw[section][inner] = {**raw[section][inner], leaf: value}
        else:
            raise ConfigError(f"{section}.{inner} in {where} must be a mapping of keys, got {raw[section][inner]!r}")
    if overrides:
        where += " with overrides " + ", ".join(f"{k}={v!r}" for k, v in items)

    try:
        built = {name: _build_section(cls, raw[name], name, where) for name, cls in sections.items()}
    except ConfigError as err:
        raise ConfigError(f"{err} (in {where})") from None
    except TypeError as err:  # a dataclass check fed a value of the right type but wrong kind
        raise ConfigError(f"{err} (in {where})") from None
    return Config(**built, source=where)


def describe(cfg: Config) -> str:
    """Resolved parameters with their documentation, one line each (``list-params``)."""
    lines = [f"# {cfg.source}"]
    for sec in _sections():
        obj = getattr(cfg, sec.name)
        docs = field_docs(type(obj))
        lines.append(f"\n{sec.name}:  # {(type(obj).__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):  # a nested section: its keys one level deeper
                lines.append(f"  {f.name}:  # {docs.get(f.name, '')}")
                inner = field_docs(type(value))
                lines += [f"    {g.name}: {json.dumps(getattr(value, g.name), ensure_ascii=False)}  # {inner.get(g.name, '')}"
                          for g in dataclasses.fields(value)]
                continue
            lines.append(f"  {f.name}: {json.dumps(value, ensure_ascii=False)}  # {docs.get(f.name, '')}")
    return "\n".join(lines)
