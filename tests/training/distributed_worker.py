"""One of two processes that tests/training/test_distributed.py starts with `accelerate launch` (gloo, CPU).

It samples reasoning whose rows stop at steps that differ between the processes, without and with `synced`,
then wraps the model in FSDP 1 as training/configs/accelerate/fsdp.yaml does (decoder layers as units, original
parameters) and samples again inside `Run.generation_weights`. What it saw goes to <out>/rank<i>.json.

    python -m tests.training.distributed_worker --model DIR --out DIR
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from mmr1.generation import generate, generation_sequence
from mmr1.loading import load_model
from mmr1.prompting import batch_prefix, embed_sequence
from mmr1.sampling import Modality, SamplingSettings, sample_tokens
from training.config import build_config
from training.engine import Objective, Run
from training.sft import SFTConfig

MAX_TOKENS = 10
# Row i of process p is made to stop after STOPS_AFTER[p][i] tokens: process 0 ends 4 steps before process 1.
STOPS_AFTER = ((2, 3), (5, 7))


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


def wrap_in_fsdp(run: Run, mm) -> None:
    """What accelerate's FSDP 1 plugin makes of the Objective with fsdp.yaml, on the CPU (accelerate itself only
    enables FSDP on accelerators)."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    run.objective = FullyShardedDataParallel(
        Objective(mm.model, loss=None), auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=torch.device("cpu"), use_orig_params=True,
    )
    run.accelerator.state.distributed_type = DistributedType.FSDP


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
    wrap_in_fsdp(run, mm)
    with run.generation_weights():
        seen["fsdp"] = {
            # full inside: a root-unit parameter; still sharded (flat, 1-D) outside its forward: a decoder layer's
            "head_weight_dims": mm.model.lm_head.weight.dim(),
            "decoder_weight_dims": mm.language_model.layers[0].self_attn.q_proj.weight.dim(),
            "reasoning": sample_reasoning(mm, stops_after, seed=rank, synced=True),
            "image": generate(mm, "a red square", seed=3, synced=True).tokens.tolist(),
        }
    (args.out / f"rank{rank}.json").write_text(json.dumps(seen), encoding="utf-8")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()


if __name__ == "__main__":
    main()
