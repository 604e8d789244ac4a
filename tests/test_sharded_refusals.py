"""README: LoRA adapters and the on-policy methods train with one process or DDP; under FSDP and
DeepSpeed (and Megatron-LM), which shard the model, they are refused with a message naming what to use.
accelerate runs FSDP and DeepSpeed only on GPUs, so the trainers get a stand-in accelerator that
reports the sharded distributed type, as accelerate's would, and nothing else."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from test_lora import lora_
from test_trainers import cfg_, make_groups
from vcb_lib.models import load_policy, load_tokenizer
from vcb_lib.onpolicy import OnPolicyTrainer
from vcb_lib.trainers import Trainer

SHARDED = [DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM]


@pytest.fixture(scope="module")
def tiny():
    tok, base = load_tokenizer("tiny-random"), load_policy("tiny-random")
    return tok, base, make_groups(tok, base, 4)


def sharded_accelerator(kind: DistributedType) -> SimpleNamespace:
    """What the trainers read of an ``Accelerator`` before they prepare anything: one process of a
    ``kind`` run (``distributed_type``), no DeepSpeed plugin to configure."""
    return SimpleNamespace(distributed_type=kind, num_processes=1, process_index=0, gradient_accumulation_steps=1,
                           state=SimpleNamespace(deepspeed_plugin=None))


@pytest.mark.parametrize("kind", SHARDED, ids=lambda k: k.name)
def test_lora_is_refused_under_a_sharded_accelerator(tiny, tmp_path, kind):
    tok, base, groups = tiny
    with pytest.raises(ValueError, match=rf"training.lora trains adapters with one process or DDP; under {kind.name} "
                                         r".*use params/accelerate/single.yaml or ddp.yaml, or turn training.lora off"):
        Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg_(batch_size=2, log_with="none"), tmp_path / "out",
                accelerator=sharded_accelerator(kind), lora=lora_())
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("kind", SHARDED, ids=lambda k: k.name)
def test_the_same_training_without_lora_is_not_refused_there(tiny, tmp_path, kind):
    """The refusal is LoRA's: without adapters the trainer gets past the check (it then fails on the
    stand-in, which cannot prepare a model)."""
    tok, base, groups = tiny
    with pytest.raises(AttributeError, match="prepare"):
        Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg_(batch_size=2, log_with="none"), tmp_path / "out",
                accelerator=sharded_accelerator(kind), lora=lora_(enabled=False))


@pytest.mark.parametrize("kind", SHARDED, ids=lambda k: k.name)
def test_the_on_policy_methods_are_refused_under_a_sharded_accelerator(tiny, kind):
    tok, base, _ = tiny
    with pytest.raises(ValueError, match=rf"the on-policy methods sample with the whole policy on every process, which "
                                         rf"{kind.name} shards: train them with one process or DDP "
                                         r"\(training.accelerate_config: params/accelerate/ddp.yaml\)"):
        OnPolicyTrainer(copy.deepcopy(base), tok, cfg_(log_with="none"), total_steps=1,
                        accelerator=sharded_accelerator(kind))
    with pytest.raises(AttributeError, match="prepare"):  # under DDP the trainer goes on (to prepare its model)
        OnPolicyTrainer(copy.deepcopy(base), tok, cfg_(log_with="none"), total_steps=1,
                        accelerator=sharded_accelerator(DistributedType.MULTI_GPU))
