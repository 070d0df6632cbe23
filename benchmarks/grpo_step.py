"""One GRPO step, broken down: rollout (reasoning, subject and image tokens, VQ decode), reward, log-prob
recompute (policy and reference), backward, optimizer; with samples/s.

    python -m benchmarks.grpo_step                    # the shipped mmr1-world with its CLIP reward, 3 steps
    python -m benchmarks.grpo_step --steps 5 --num-generations 16

It runs training.grpo.train itself (what `python -m training.grpo` runs) on the demo task and reads the phase
times the trainer logs to metrics.jsonl; the first step (warm-up) is left out of the means when there are more.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import add_device_options, apply_threads, machine, table

PHASES = ("rollout", "reward", "logprobs", "backward", "optimizer")


def main(argv: list[str] | None = None) -> int:
    from mmr1.embedded import MODEL_NAME, REWARD_NAME, demo_task, embedded_path
    from training.config import build_config
    from training.data import Record, write_records
    from training.grpo import GRPOConfig, train

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

    with tempfile.TemporaryDirectory(prefix="mmr1-grpo-bench-") as work:
        work = Path(work)
        references, prompt = demo_task()
        write_records(work / "records.jsonl", [Record(id="demo", references=tuple(references), prompt=prompt)])
        config = build_config(GRPOConfig, {
            "model": args.model, "data": str(work / "records.jsonl"), "output_dir": str(work / "run"),
            "steps": args.steps, "num_generations": args.num_generations, "prompts_per_step": args.prompts_per_step,
            "max_reasoning_tokens": args.max_reasoning_tokens, "cfg_scale": 3.0, "beta": 0.01, "learning_rate": 2e-5,
            "rewards": [f"clip_i={args.reward_model}@1", f"clip_t={args.reward_model}@1", "format@0.1"],
            "dtype": "fp32" if args.dtype == "auto" else args.dtype, "save_every": 0, "log_every": 1,
            **({"device": args.device} if args.device else {}),
        })
        train(config)
        lines = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "step" in line and "seconds_rollout" in line]
    measured = steps[1:] or steps

    def mean(key: str) -> float:
        return sum(line[key] for line in measured) / len(measured)

    step_seconds = mean("step_seconds")
    rows = [[phase, f"{mean(f'seconds_{phase}'):.3f}", f"{100 * mean(f'seconds_{phase}') / step_seconds:.0f} %"]
            for phase in PHASES]
    other = step_seconds - sum(mean(f"seconds_{phase}") for phase in PHASES)
    rows += [["other (loss, logging, data)", f"{other:.3f}", f"{100 * other / step_seconds:.0f} %"],
             ["step", f"{step_seconds:.3f}", "100 %"]]
    samples = args.num_generations * args.prompts_per_step
    print(f"machine: {machine()}")
    print(f"model: {args.model}; {args.prompts_per_step} prompt(s) x G={args.num_generations} rollouts per step, "
          f"mean of steps {measured[0]['step']}..{measured[-1]['step']}")
    print(table(["phase", "seconds per step", "share"], rows))
    print(f"samples/s: {mean('samples_per_s'):.2f} ({samples} rollouts per step); rollout image+text tokens/s: "
          f"{mean('rollout_tokens_per_s'):.1f}; GRPO steps per hour: {3600 / step_seconds:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
