"""The benchmark scripts run end to end on small settings and print well-formed figures (their speed targets are
measured on real sizes by hand, see the README's performance section; tests never depend on timing)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(name: str, *args: str) -> str:
    """`python -m benchmarks.<name> ...` from the checkout's root, as the README runs them."""
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], capture_output=True, text=True,
                            timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("machine: ") or "\nmachine: " in result.stdout
    return result.stdout


def rows(output: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell."""
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()
             if line.startswith("| ") and not line.startswith("|---")]
    return {row[0]: row[1:] for row in cells[1:]}


def number(cell: str) -> float:
    return float(re.match(r"[-\d.]+", cell).group())


def test_sampler_benchmark_runs_every_contender():
    output = run("sampler", "--tokens", "16", "--naive-tokens", "8", "--repeats", "1", "--images", "2", "--compile")
    table = rows(output)
    assert set(table) == {"mmr1 sampler", "mmr1 sampler, with log-probs", "mmr1 sampler, compiled",
                          "transformers generate", "naive loop, no KV cache", "memory-bandwidth bound"}
    assert re.search(r"the first run \(compiling\) took \d+\.\d s", output)
    assert table["naive loop, no KV cache"][0] == "8" and table["mmr1 sampler"][0] == "16"
    assert number(table["transformers generate"][-1]) == pytest.approx(1.0)
    assert all(number(row[2]) > 0 for row in table.values())  # image tokens/s


def test_xcot_benchmark_times_every_stage_of_both_contenders():
    output = run("xcot", "--images", "2")
    table = rows(output)
    stages = ["1. grounding text", "2. subject tokens (VQ encode)", "3a. image prefix (embed references, subject)",
              "3b. image tokens", "3c. VQ decode"]
    assert list(table) == [*stages, "end to end"]
    for column in (0, 1):  # per row, shared prefix: the stages add up to the end-to-end time
        assert sum(number(table[stage][column]) for stage in stages) == pytest.approx(
            number(table["end to end"][column]), abs=0.005)
    speedup = number(table["end to end"][0]) / number(table["end to end"][1])
    assert number(table["end to end"][2]) == pytest.approx(speedup, abs=0.01)
    assert "same image tokens from both: True" in output


def test_grpo_step_benchmark_breaks_a_step_down():
    output = run("grpo_step", "--steps", "2", "--num-generations", "2", "--prompts-per-step", "1",
                 "--max-reasoning-tokens", "8")
    table = rows(output)
    phases = ["rollout", "reward", "logprobs", "backward", "optimizer", "other (loss, logging, data)"]
    assert list(table) == [*phases, "step"]
    for column in (0, 1):  # per row, shared prefix
        parts = sum(number(table[phase][column]) for phase in phases)
        assert parts == pytest.approx(number(table["step"][column]), rel=0.02)
        assert number(table["rollout"][column]) > 0 and number(table["backward"][column]) > 0
    rates = re.search(r"samples/s: per row (\d+\.\d+), shared prefix (\d+\.\d+) \((\d+\.\d+)x; 2 rollouts per step\)",
                      output)
    assert rates and float(rates[3]) == pytest.approx(float(rates[2]) / float(rates[1]), rel=0.1)  # of 2-decimal figures


def test_quantization_benchmark_measures_every_choice_and_projects_another_shape():
    table_rows = [line for line in run("quantization", "--shape", "tiny", "--project", "janus-pro-1b").splitlines()
                  if line.startswith("| tiny") or line.startswith("| janus-pro-1b")]
    assert [row.split("|")[1:3] for row in table_rows] == [
        [f" {shape} ", f" {choice} "] for shape in ("tiny", "janus-pro-1b") for choice in ("none", "int8", "nf4")]
    ratios = [number(row.split("|")[6].strip()) for row in table_rows]
    assert ratios[0] == ratios[3] == 1.0 and all(ratio < 1.0 for ratio in ratios[1:3] + ratios[4:])


def test_load_benchmark_compares_with_reading_the_files(tmp_path):
    output = run("load", "--shape", "tiny", "--folder", str(tmp_path / "tiny"), "--repeats", "1")
    table = rows(output)
    assert list(table) == ["read the files", "mmr1 load_model", "transformers from_pretrained"]
    assert table["read the files"][2] == "1.00x"
    files = sum(file.stat().st_size for file in (tmp_path / "tiny").glob("*.safetensors"))
    assert f"weight files {files / 2**30:.2f} GiB" in output
    assert all(number(row[1]) >= number(row[0]) > 0 for row in table.values())  # ready = load + reading weights


def test_load_benchmark_converts_the_deepseek_layout_and_the_dtype(tmp_path):
    output = run("load", "--shape", "tiny", "--folder", str(tmp_path / "tiny"), "--repeats", "1",
                 "--layout", "deepseek", "--dtype", "bf16", "--load-dtype", "fp32")
    assert "deepseek layout, bf16 on disk, loaded as fp32" in output
    assert (tmp_path / "tiny" / "pytorch_model.bin").is_file()
    table = rows(output)
    assert list(table) == ["read the files", "mmr1 load_model"]  # transformers cannot read this layout
    assert number(table["mmr1 load_model"][1]) > 0
