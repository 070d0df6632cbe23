"""One GRPO step, broken down: rollout (reasoning, subject and image tokens, VQ decode), reward, log-prob
recompute (policy and reference), backward, optimizer; with samples/s.

    python -m benchmarks.grpo_step                    # the shipped mmr1-world with its CLIP reward, 3 steps
    python -m benchmarks.grpo_step --steps 5 --num-generations 16

It runs training.grpo.train itself (what `python -m training.grpo` runs) on the demo task and reads the phase
times the trainer logs to metrics.jsonl; the first step (warm-up) is left out of the means when there are more.
Two contenders run one after the other in this process, on the same records and seeds: `shared prefix` (the
trainer as it is: a group's G reasoning rollouts prefill their common prompt once) and `per row` (every rollout
row prefills it itself, as before; the sampler given the prefix repeated row by row, which samples the same
tokens).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import add_device_options, apply_threads, machine, table

PHASES = ("rollout", "reward", "logprobs", "backward", "optimizer")


def per_row(sample_tokens):
    """`sample_tokens` that prefills every row itself: a shared prefix is repeated row by row instead."""
    from mmr1.decoding import repeat_rows

    def sample(mm, prefix, *args, repeats: int = 1, unconditional=None, **kwargs):
        unconditional = None if unconditional is None else repeat_rows(unconditional, repeats)
        return sample_tokens(mm, repeat_rows(prefix, repeats), *args, unconditional=unconditional, **kwargs)

    return sample


def run_steps(config_values: dict, work: Path, shared: bool) -> list[dict]:
    """Train `steps` GRPO steps under one contender; the metrics lines of the steps."""
    from contextlib import nullcontext
    from unittest import mock

    import training.grpo as grpo
    from training.config import build_config

    config = build_config(grpo.GRPOConfig, {**config_values, "output_dir": str(work)})
    patch = nullcontext() if shared else mock.patch.object(grpo, "sample_tokens", per_row(grpo.sample_tokens))
    with patch:
        grpo.train(config)
    lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "step" in line and "seconds_rollout" in line]


def main(argv: list[str] | None = None) -> int:
    from mmr1.embedded import MODEL_NAME, REWARD_NAME, demo_task, embedded_path
    from training.data import Record, write_records

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(embedded_path(MODEL_NAME)), help="checkpoint folder (default: mmr1-world)")
    parser.add_argument("--reward-model", default=str(embedded_path(REWARD_NAME)), help="CLIP folder for clip_i/clip_t")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-generations", type=int, default=8, help="group size G")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--max-reasoning-tokens", type=int, default=72)
    add_device_options(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)

    contenders = {"per row": False, "shared prefix": True}
    measured = {}
    with tempfile.TemporaryDirectory(prefix="mmr1-grpo-bench-") as work:
        work = Path(work)
        references, prompt = demo_task()
        write_records(work / "records.jsonl", [Record(id="demo", references=tuple(references), prompt=prompt)])
        values = {
            "model": args.model, "data": str(work / "records.jsonl"),
            "steps": args.steps, "num_generations": args.num_generations, "prompts_per_step": args.prompts_per_step,
            "max_reasoning_tokens": args.max_reasoning_tokens, "cfg_scale": 3.0, "beta": 0.01, "learning_rate": 2e-5,
            "rewards": [f"clip_i={args.reward_model}@1", f"clip_t={args.reward_model}@1", "format@0.1"],
            "dtype": "fp32" if args.dtype == "auto" else args.dtype, "save_every": 0, "log_every": 1,
            **({"device": args.device} if args.device else {}),
        }
        for name, shared in contenders.items():
            steps = run_steps(values, work / name.replace(" ", "-"), shared)
            measured[name] = steps[1:] or steps

    def mean(name: str, key: str) -> float:
        return sum(line[key] for line in measured[name]) / len(measured[name])

    first, second = contenders
    rows = []
    for phase in PHASES:
        times = [mean(name, f"seconds_{phase}") for name in contenders]
        rows.append([phase, *(f"{seconds:.3f}" for seconds in times), f"{times[0] / max(times[1], 1e-9):.2f}x"])
    others = [mean(name, "step_seconds") - sum(mean(name, f"seconds_{phase}") for phase in PHASES)
              for name in contenders]
    rows.append(["other (loss, logging, data)", *(f"{seconds:.3f}" for seconds in others), ""])
    steps = [mean(name, "step_seconds") for name in contenders]
    rows.append(["step", *(f"{seconds:.3f}" for seconds in steps), f"{steps[0] / steps[1]:.2f}x"])
    samples = args.num_generations * args.prompts_per_step
    rates = [mean(name, "samples_per_s") for name in contenders]
    print(f"machine: {machine()}")
    print(f"model: {args.model}; {args.prompts_per_step} prompt(s) x G={args.num_generations} rollouts per step, "
          f"mean of steps {measured[second][0]['step']}..{measured[second][-1]['step']}")
    print(table(["phase", *(f"{name} (s per step)" for name in contenders), "speed-up"], rows))
    print(f"samples/s: {first} {rates[0]:.2f}, {second} {rates[1]:.2f} ({rates[1] / rates[0]:.2f}x; {samples} "
          f"rollouts per step); {second} rollout image+text tokens/s: {mean(second, 'rollout_tokens_per_s'):.1f}; "
          f"GRPO steps per hour: {3600 / steps[1]:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
