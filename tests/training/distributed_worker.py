"""One of two processes that tests/training/test_distributed.py starts with `accelerate launch` (gloo, CPU).

It samples reasoning whose rows stop at steps that differ between the processes, without and with `synced`;
takes one DDP step through `Run.prepare` and scores a GRPO group with the unwrapped KL reference; then wraps the
model in FSDP 1 as training/configs/accelerate/fsdp.yaml does (decoder layers as units, original parameters) and
the reference with `Run.prepare_reference` (accelerate's FSDP plugin from the FSDP_* variables the test passes
on), and samples and scores again inside `Run.generation_weights`. What it saw goes to <out>/rank<i>.json.

    python -m tests.training.distributed_worker --model DIR --out DIR
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmr1.generation import generate, generation_sequence
from mmr1.loading import load_model
from mmr1.prompting import batch_prefix, embed_sequence
from mmr1.sampling import Modality, SamplingSettings, sample_tokens
from training.config import build_config
from training.data import Record
from training.engine import Objective, Run
from training.grpo import GRPOConfig, Group, rollout, score_reference
from training.policy import Policy, make_policy
from training.rewards import build_rewards
from training.sft import SFTConfig

MAX_TOKENS = 10
# Row i of process p is made to stop after STOPS_AFTER[p][i] tokens: process 0 ends 4 steps before process 1.
STOPS_AFTER = ((2, 3), (5, 7))
SEGMENTS = ("reasoning", "image")


def stopping_head(mm, stops_after: tuple[int, ...]):
    """The text head, with the stop token forced from the token where row i has sampled stops_after[i]."""
    calls = [0]

    def head(hidden: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        logits = mm.text_logits(hidden)
        for row, after in enumerate(stops_after):
            if calls[0] >= after:
                logits[row, mm.tokens.eos] = 1e4
        return logits

    return head


def sample_reasoning(mm, stops_after: tuple[int, ...], seed: int, synced: bool) -> dict:
    """The sampled rows and how many language-model forwards they took."""
    forwards = []
    hook = mm.language_model.register_forward_hook(lambda *args: forwards.append(1))
    prefix = batch_prefix(mm, [embed_sequence(mm, generation_sequence(mm, "a photo of it"))] * len(stops_after))
    try:
        sampled = sample_tokens(
            mm, prefix, Modality(stopping_head(mm, stops_after), mm.embed_text), MAX_TOKENS,
            SamplingSettings(cfg_scale=1.0), seed, stop_tokens=(mm.tokens.eos,), pad_token=mm.tokens.pad,
            return_logprobs=True, synced=synced,
        )
    finally:
        hook.remove()
    return {"tokens": sampled.tokens.tolist(), "logprobs": sampled.logprobs.tolist(),
            "lengths": sampled.lengths.tolist(), "forwards": len(forwards)}


def ddp_gradients(run: Run, policy: Policy) -> dict:
    """One synchronised backward through the DDP objective `Run.prepare` builds (this launch is DDP): how many
    trainable parameters got a gradient, and how many storages those gradients live in."""
    mm = policy.mm

    def loss(ids: torch.Tensor) -> torch.Tensor:
        hidden = mm.language_model(inputs_embeds=mm.embed_text(ids)).last_hidden_state
        return mm.text_logits(hidden).logsumexp(-1).mean()

    objective = run.prepare(policy, loss)
    with run.micro_step(last=True):
        run.backward(objective(torch.tensor([[1, 2, 3, 4]])))
    gradients = [parameter.grad for parameter in run.parameters if parameter.grad is not None]
    storages = {gradient.untyped_storage().data_ptr() for gradient in gradients}
    run.optimizer_step()
    return {"gradients": len(gradients), "storages": len(storages)}


def reference_group(mm, out: Path, rank: int) -> Group:
    """This process's GRPO group for the reference to score: reasoning and guided image rollouts of a record with
    one reference image (so the reference's aligner embeds its features)."""
    reference = out / f"reference{rank}.png"
    Image.fromarray(np.full((32, 32, 3), 80 + 90 * rank, dtype=np.uint8)).save(reference)
    config = build_config(GRPOConfig, {"model": "unused", "data": "unused.jsonl", "num_generations": 2,
                                       "max_reasoning_tokens": 4, "cfg_scale": 2.0, "top_k": 8})
    record = Record(id=f"r{rank}", references=(reference,), prompt="a photo of it")
    return rollout(mm, record, config, build_rewards(config.rewards), seeds=(rank, rank), synced=True)


def reference_logprobs(policy: Policy, group: Group) -> dict[str, list]:
    score_reference(policy, group, SEGMENTS)
    return {name: group.segments[name].reference_logprobs.tolist() for name in SEGMENTS}


def wrap_in_fsdp(run: Run, mm) -> None:
    """What accelerate's FSDP 1 plugin makes of the Objective with fsdp.yaml, on the CPU (accelerate itself only
    enables FSDP on accelerators), with that plugin in the accelerator's state for `Run.prepare_reference`."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    run.objective = FullyShardedDataParallel(
        Objective(mm.model, loss=None), auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=torch.device("cpu"), use_orig_params=True,
    )
    run.accelerator.state.distributed_type = DistributedType.FSDP
    run.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    run.accelerator.state.device = torch.device("cpu")  # FSDP's CPU device has no index, accelerate's "cpu:0" one


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run = Run("sft", build_config(SFTConfig, {"model": str(args.model), "data": "unused.jsonl", "device": "cpu",
                                              "output_dir": str(args.out / "run")}))
    rank = run.process_index
    mm = load_model(args.model, dtype="fp32", device="cpu")
    mm.model.eval()
    stops_after = STOPS_AFTER[rank]
    seen = {
        "unsynced": sample_reasoning(mm, stops_after, seed=rank, synced=False),
        "synced": sample_reasoning(mm, stops_after, seed=rank, synced=True),
        "image": generate(mm, "a red square", seed=3).tokens.tolist(),
    }
    policy = make_policy(load_model(args.model, dtype="fp32", device="cpu"), args.model, None, with_reference=True)
    seen["ddp_gradients"] = ddp_gradients(run, policy)
    group = reference_group(mm, args.out, rank)
    seen["reference_logprobs"] = reference_logprobs(policy, group)
    layers = policy.reference_model.model.language_model.layers
    seen["reference_decoder_numel"] = sum(parameter.numel() for parameter in layers.parameters())

    wrap_in_fsdp(run, mm)
    policy.reference_model = run.prepare_reference(policy.reference_model)
    with run.generation_weights():
        seen["fsdp"] = {
            # full inside: a root-unit parameter; still sharded (flat, 1-D) outside its forward: a decoder layer's
            "head_weight_dims": mm.model.lm_head.weight.dim(),
            "decoder_weight_dims": mm.language_model.layers[0].self_attn.q_proj.weight.dim(),
            "reasoning": sample_reasoning(mm, stops_after, seed=rank, synced=True),
            "image": generate(mm, "a red square", seed=3, synced=True).tokens.tolist(),
            "reference_logprobs": reference_logprobs(policy, group),  # as the trainer scores, inside this block
        }
        with policy.reference() as reference:
            seen["fsdp"]["reference_inside"] = {
                "model_is_the_wrapped_module": reference.model is policy.reference_model.module,
                "head_weight_dims": reference.model.lm_head.weight.dim(),
                "decoder_weight_dims": reference.language_model.layers[0].self_attn.q_proj.weight.dim(),
            }
    layers = policy.reference_model.model.language_model.layers
    seen["fsdp"]["reference_outside"] = {
        "head_weight_dims": policy.reference_model.lm_head.weight.dim(),
        "decoder_weight_dims": sorted({parameter.dim() for parameter in layers.parameters()}),
        "decoder_numel": sum(parameter.numel() for parameter in layers.parameters()),
        "training": policy.reference_model.training,
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(seen), encoding="utf-8")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()


if __name__ == "__main__":
    main()
