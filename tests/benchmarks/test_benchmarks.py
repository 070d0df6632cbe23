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


def test_xcot_benchmark_times_every_stage():
    table = rows(run("xcot", "--images", "2"))
    assert list(table) == ["1. grounding text", "2. subject tokens (VQ encode)",
                           "3a. image prefix (embed references, subject)", "3b. image tokens", "3c. VQ decode"]
    assert sum(number(row[1]) for row in table.values()) == pytest.approx(100, abs=3)  # shares add up


def test_grpo_step_benchmark_breaks_a_step_down():
    output = run("grpo_step", "--steps", "2", "--num-generations", "2", "--prompts-per-step", "1",
                 "--max-reasoning-tokens", "8")
    table = rows(output)
    phases = ["rollout", "reward", "logprobs", "backward", "optimizer", "other (loss, logging, data)"]
    assert list(table) == [*phases, "step"]
    parts = sum(number(table[phase][0]) for phase in phases)
    assert parts == pytest.approx(number(table["step"][0]), rel=0.02)
    assert number(table["rollout"][0]) > 0 and number(table["backward"][0]) > 0
    assert re.search(r"samples/s: \d+\.\d+ \(2 rollouts per step\)", output)


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
