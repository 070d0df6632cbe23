"""The trainable policy: which weights train, the frozen reference for the KL, and the folder it is exported as.

Full fine-tuning trains the language model and the generation heads and embeddings; the understanding encoder
and the VQ tokenizer stay frozen (as in T2I-R1 and Janus-Pro-R1). LoRA (peft) trains low-rank adapters on the
language model's projections only; it is exported as an adapter folder naming its base, which mmr1 loads and
merges, and its reference policy is the same model with the adapters switched off, so no copy is kept.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmr1.errors import MMR1Error
from mmr1.model import MMR1Model

from .checkpoints import write_training_record

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]


@dataclass
class Policy:
    mm: MMR1Model
    base: Path  # the folder training started from; LoRA exports point at it
    adapter: object | None = None  # the PeftModel around mm.model when training LoRA
    reference_model: torch.nn.Module | None = None  # frozen copy for the KL (full fine-tuning)
    # How the engine that wrapped reference_model opens it for scoring: the bare model, its weights usable inside
    # (Run.prepare_reference sets it; an unwrapped reference is used as it is).
    open_reference: Callable[[torch.nn.Module], contextlib.AbstractContextManager] = contextlib.nullcontext

    @property
    def is_lora(self) -> bool:
        return self.adapter is not None

    @contextlib.contextmanager
    def reference(self):
        """`mm` as the frozen reference policy (the initial weights) inside the block."""
        if self.is_lora:
            with torch.no_grad(), self.adapter.disable_adapter():
                yield self.mm
            return
        if self.reference_model is None:
            raise RuntimeError("The policy was built without a reference model (beta = 0).")
        with self.open_reference(self.reference_model) as model, torch.no_grad():
            reference = copy.copy(self.mm)
            reference.model = model
            yield reference

    def save(self, folder: Path, state_dict: dict[str, torch.Tensor], record: dict) -> None:
        """Write the model (full: safetensors folder; LoRA: adapter naming its base), processor and record."""
        if self.is_lora:
            self.adapter.peft_config["default"].base_model_name_or_path = str(self.base.resolve())
            peft_state = {f"base_model.model.{key}": value for key, value in state_dict.items()}
            self.adapter.save_pretrained(folder, state_dict=peft_state, safe_serialization=True)
        else:
            self.mm.model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        self.mm.processor.save_pretrained(folder)
        write_training_record(folder, record)


def frozen_modules(mm: MMR1Model) -> tuple[torch.nn.Module, ...]:
    """What never trains: the understanding vision tower and the VQ tokenizer."""
    return mm.model.model.vision_model, mm.model.model.vqmodel


def frozen_reference(mm: MMR1Model, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A frozen copy of the trainable part of `mm.model` for the KL, in `dtype` when given (bf16 halves it).

    The vision tower and the VQ are left out (identities stand in their place): they never train, and the
    reference reads the references' SigLIP features that the policy computed, so copying them would only cost
    memory (and, under a sharding engine, a second shard of the same weights).
    """
    reference = copy.deepcopy(mm.model, memo={id(module): torch.nn.Identity() for module in frozen_modules(mm)})
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
        if dtype is not None:  # parameters only: buffers such as the rotary frequencies stay fp32
            parameter.data = parameter.data.to(dtype)
    return reference.eval()


def make_policy(mm: MMR1Model, base: Path, lora: LoraSettings | None, with_reference: bool,
                reference_dtype: torch.dtype | None = None) -> Policy:
    """Mark the trainable weights (full or LoRA) and keep what the KL's reference needs."""
    for parameter in mm.model.parameters():
        parameter.requires_grad_(False)
    if lora is None:
        reference = frozen_reference(mm, reference_dtype) if with_reference else None
        frozen = {id(p) for module in frozen_modules(mm) for p in module.parameters()}
        for parameter in mm.model.parameters():
            parameter.requires_grad_(id(parameter) not in frozen)
        return Policy(mm, Path(base), reference_model=reference)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise MMR1Error("LoRA training needs the peft package (pip install peft).") from error
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=rf"model\.language_model\..*\.({'|'.join(lora.targets)})",
    )
    adapter = get_peft_model(mm.model, config)  # injects the adapters into mm.model in place
    if not any(p.requires_grad for p in mm.model.parameters()):
        raise MMR1Error(f"No LoRA target among the language model's modules matches {list(lora.targets)}.")
    return Policy(mm, Path(base), adapter=adapter)
