"""The run machinery under both recipes: kill -9 and resume, two processes under `accelerate launch`, LoRA,
mixed precision, curves and sample grids. Runs go through the real command lines in subprocesses."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from training.config import ConfigError, build_config
from training.data import Record, RecordOrder, write_records
from training.engine import TRAINER_STATE
from training.grpo import GRPOConfig
from training.grpo import main as grpo_main

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine_data")
    records = []
    for index, value in enumerate((60, 200, 120)):
        Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(folder / f"ref{index}.png")
        records.append(Record(id=f"r{index}", references=(folder / f"ref{index}.png",), prompt=f"photo {index}"))
    write_records(folder / "prompts.jsonl", records)
    return folder / "prompts.jsonl"


def write_config(folder: Path, model: Path, prompts: Path, **values) -> Path:
    base = {"model": str(model), "data": str(prompts), "num_generations": 4, "cfg_scale": 2.0,
            "max_reasoning_tokens": 4, "steps": STEPS, "save_every": 2, "learning_rate": 1e-3, "beta": 0.02,
            "device": "cpu", "seed": 5, "output_dir": str(folder / "run")}
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in {**base, **values}.items())
    path = folder / "grpo.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def grpo_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.grpo", "--config", str(config), *extra]


def run(command: list[str], timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def metric_steps(output: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]


def hidden_leftovers(output: Path) -> list[str]:
    return sorted(path.name for folder in (output, output / "checkpoints") if folder.is_dir()
                  for path in folder.iterdir() if path.name.startswith("."))


@pytest.fixture(scope="module")
def uninterrupted(tiny_hf_dir, prompts, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    run(grpo_command(write_config(folder, tiny_hf_dir, prompts)))
    return folder / "run"


# A real SIGKILL at the worst moment: the checkpoint of step 4 is completely written but not yet renamed into place.
KILL_WHILE_PUBLISHING = textwrap.dedent("""
    import os, signal, sys
    import training.engine as engine
    publish = engine.publish
    def killed_on_step_4(temporary, destination):
        if destination.name == "step-000004":
            os.kill(os.getpid(), signal.SIGKILL)
        return publish(temporary, destination)
    engine.publish = killed_on_step_4
    from training.grpo import main
    sys.exit(main(sys.argv[1:]))
""")


def kill_while_publishing(config: Path, output: Path) -> None:
    result = subprocess.run([sys.executable, "-c", KILL_WHILE_PUBLISHING, "--config", str(config)], cwd=ROOT,
                            env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (output / "checkpoints" / ".step-000004.tmp").is_dir()  # the complete but unpublished step 4


def kill_from_outside(config: Path, output: Path) -> None:
    """`kill -9` from another process once step 3 is logged (after checkpoint 2, before the run ends)."""
    process = subprocess.Popen(grpo_command(config), cwd=ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = output / "metrics.jsonl"
        if metrics.exists() and any(step >= 3 for step in metric_steps(output)):
            break
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.parametrize("kill", [kill_while_publishing, kill_from_outside], ids=["while-publishing", "from-outside"])
def test_kill_9_then_resume_gives_the_uninterrupted_checkpoint(kill, tiny_hf_dir, prompts, uninterrupted, tmp_path):
    from mmr1.loading import load_model

    config = write_config(tmp_path, tiny_hf_dir, prompts)
    output = tmp_path / "run"
    kill(config, output)
    assert not (output / "final").exists()
    for checkpoint in (output / "checkpoints").glob("step-*"):  # whatever is visible is complete and loads
        assert (checkpoint / TRAINER_STATE).is_file() and (checkpoint / "engine_state" / "optimizer.bin").is_file()
        assert load_model(checkpoint, device="cpu").num_image_tokens > 0

    result = run(grpo_command(config))
    assert "resumed from" in result.stdout
    resumed, reference = weights(output / "final"), weights(uninterrupted / "final")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)
    assert metric_steps(output) == list(range(1, STEPS + 1))
    assert hidden_leftovers(output) == []
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


def test_a_changed_config_does_not_resume_into_the_old_run(tiny_hf_dir, prompts, uninterrupted):
    with pytest.raises(ConfigError, match="learning_rate"):
        from training.engine import Run

        Run("grpo", build_config(GRPOConfig, {"model": str(tiny_hf_dir), "data": str(prompts),
                                              "output_dir": str(uninterrupted), "learning_rate": 0.5}))
    with pytest.raises(ConfigError, match="resume = true"):
        from training.engine import Run

        Run("grpo", build_config(GRPOConfig, {"model": str(tiny_hf_dir), "data": str(prompts),
                                              "output_dir": str(uninterrupted), "resume": False}))


def test_two_processes_under_accelerate_equal_one_process_with_both_groups(tiny_hf_dir, prompts, tmp_path):
    """Rollouts are sharded: with 2 processes × 1 group, each process samples its own group, and the averaged
    gradients give the checkpoint of 1 process × 2 groups (up to summation order)."""
    from mmr1.generation import generate
    from mmr1.loading import load_model

    sharded = write_config(tmp_path / "sharded", tiny_hf_dir, prompts, steps=3, save_every=0, prompts_per_step=1)
    single = write_config(tmp_path / "single", tiny_hf_dir, prompts, steps=3, save_every=0, prompts_per_step=2)
    result = run([sys.executable, "-m", "accelerate.commands.launch",
                  "--config_file", str(ROOT / "training" / "configs" / "accelerate" / "ddp.yaml"),
                  "--num_processes", "2", "--main_process_port", "29517",
                  "-m", "training.grpo", "--config", str(sharded)])
    assert result.stdout.count("final checkpoint:") == 1
    run(grpo_command(single))
    state = (tmp_path / "sharded" / "run" / "checkpoints" / "step-000003" / "engine_state")
    assert sorted(path.name for path in state.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    two, one = weights(tmp_path / "sharded" / "run" / "final"), weights(tmp_path / "single" / "run" / "final")
    start = weights(tiny_hf_dir)
    assert any(not torch.equal(two[key], start[key]) for key in start)  # it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4)
    assert metric_steps(tmp_path / "sharded" / "run") == [1, 2, 3]
    mm = load_model(tmp_path / "sharded" / "run" / "final", device="cpu")
    assert generate(mm, "a photo", num_images=1, seed=0).images.shape[0] == 1


def test_lora_bf16_with_gradient_checkpointing_exports_an_adapter_that_loads(tiny_hf_dir, prompts, tmp_path):
    from mmr1.generation import generate
    from mmr1.loading import load_model

    config = write_config(tmp_path, tiny_hf_dir, prompts, steps=2, save_every=0, lora_rank=4, lora_alpha=8.0,
                          learning_rate=5e-2, dtype="bf16", gradient_checkpointing=True, sample_every=1)
    run(grpo_command(config))
    final = tmp_path / "run" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == Path(tiny_hf_dir).resolve()
    assert not (final / "model.safetensors").exists()
    merged, base = load_model(final, device="cpu"), load_model(tiny_hf_dir, device="cpu")
    assert merged.layout == "lora"
    changed = [name for name, value in merged.model.state_dict().items()
               if not torch.equal(value, base.model.state_dict()[name])]
    assert changed and all("language_model" in name for name in changed)
    assert generate(merged, "a photo", num_images=1, seed=0).images.shape[0] == 1
    from mmr1.cli import main as mmr1_cli

    assert mmr1_cli(["generate", "--model", str(final), "--ref", str(prompts.with_name("ref0.png")),
                     "--prompt", "a photo of it", "--out", str(tmp_path / "generated"), "--device", "cpu"]) == 0
    assert len(list((tmp_path / "generated").glob("mmr1_seed*.png"))) == 1  # beside subject.png, the intermediate
    # visibility: a grid per step and the reward curves
    grid = Image.open(tmp_path / "run" / "samples" / "step-000002.png")
    assert grid.size[0] == 4 * merged.image_size
    curves = Image.open(tmp_path / "run" / "curves.png")
    assert curves.size[0] > 300 and np.unique(np.asarray(curves.convert("L"))).size > 2


def test_record_order_visits_every_record_once_per_epoch_and_resumes():
    order = RecordOrder(5, seed=3)
    first = order.take(3) + order.take(2)
    assert sorted(first) == list(range(5))
    state = order.state_dict()
    following = order.take(7)
    resumed = RecordOrder(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(7) == following
    assert sorted(following[:5]) == list(range(5)) and following[:5] != first


def test_a_missing_train_extra_is_named_before_anything_loads(monkeypatch):
    import importlib.util

    from mmr1.errors import MMR1Error
    from training.engine import require_training_extras

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "matplotlib" else find_spec(name, *args))
    with pytest.raises(MMR1Error, match=r"matplotlib: pip install -e '\.\[train\]'"):
        require_training_extras()


# -- planted pickles: a resume reads only JSON, safetensors and torch archives of tensors and plain data ----------


class Planted:
    """Unpickling it creates `marker`: the code someone could plant in a run folder they prepared."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def checkpointed(tiny_hf_dir, prompts, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2, in warmup (the schedule differs at each step), under
    a relative output_dir, so that a copy of the folder is the same run."""
    folder = tmp_path_factory.mktemp("checkpointed")
    write_config(folder, tiny_hf_dir, prompts, steps=2, save_every=1, warmup_steps=3, output_dir="run")
    run(grpo_command(folder / "grpo.toml"), cwd=folder)
    return folder


def plant_torch_archive(checkpoint: Path, name: str, marker: Path) -> Path:
    torch.save(Planted(marker), checkpoint / name)
    return checkpoint / name


def plant_raw_pickle(checkpoint: Path, name: str, marker: Path) -> Path:
    (checkpoint / name).write_bytes(pickle.dumps(Planted(marker)))
    return checkpoint / name


def plant_in_place_of_the_weights(checkpoint: Path, name: str, marker: Path) -> Path:
    """accelerate reads the model from pytorch_model.bin where model.safetensors is missing."""
    (checkpoint / "engine_state" / "model.safetensors").unlink()
    return plant_torch_archive(checkpoint, name, marker)


def unpickle(path: Path):
    """What accelerate does with custom_checkpoint_*.pkl (and torch or DeepSpeed with sharded states)."""
    return torch.load(path, weights_only=False) if path.read_bytes()[:2] == b"PK" else pickle.loads(path.read_bytes())


PLANTS = {
    "custom-checkpoint": (plant_torch_archive, "engine_state/custom_checkpoint_0.pkl"),
    "optimizer": (plant_torch_archive, "engine_state/optimizer.bin"),
    "rng-states": (plant_torch_archive, "engine_state/random_states_0.pkl"),
    "rng-states-raw-pickle": (plant_raw_pickle, "engine_state/random_states_0.pkl"),
    "model-weights": (plant_in_place_of_the_weights, "engine_state/pytorch_model.bin"),
    "extra-file": (plant_torch_archive, "engine_state/scaler.pt"),
}


def refused(case: Path, capsys) -> str:
    """Resume `case` (a copy of the checkpointed run) through the command line; returns its one `error:` line."""
    capsys.readouterr()
    assert grpo_main(["--config", str(case / "grpo.toml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("plant, name", PLANTS.values(), ids=PLANTS.keys())
def test_a_pickle_planted_where_a_resume_reads_never_runs(plant, name, checkpointed, tmp_path, monkeypatch, capsys):
    case = tmp_path / "case"
    shutil.copytree(checkpointed, case)
    monkeypatch.chdir(case)
    marker = tmp_path / "marker"
    planted = plant(case / "run" / "checkpoints" / "step-000002", name, marker)
    error = refused(case, capsys)
    assert not marker.exists()
    assert str(Path("run") / "checkpoints" / "step-000002") in error and Path(name).name in error
    unpickle(planted)  # the plant is live: unpickled as accelerate unpickles registered states, it runs
    assert marker.exists()


def test_a_checkpoint_without_its_schedule_in_json_is_refused(checkpointed, tmp_path, monkeypatch, capsys):
    """One written before the schedule moved to trainer_state.json (its pickle then was custom_checkpoint_0.pkl)."""
    case = tmp_path / "case"
    shutil.copytree(checkpointed, case)
    monkeypatch.chdir(case)
    state_file = case / "run" / "checkpoints" / "step-000002" / TRAINER_STATE
    state = json.loads(state_file.read_text())
    del state["scheduler"]
    state_file.write_text(json.dumps(state))
    assert f"has no schedule in {TRAINER_STATE}" in refused(case, capsys)


def test_a_refused_checkpoint_deleted_the_run_resumes_from_the_older_one(checkpointed, tmp_path, monkeypatch,
                                                                         capsys):
    """As the error says; the schedule (in warmup here) comes back from JSON, and the run ends bit-identical to the
    uninterrupted one. Nothing a checkpoint holds is a pickle of objects."""
    case = tmp_path / "case"
    shutil.copytree(checkpointed, case)
    monkeypatch.chdir(case)
    newest = case / "run" / "checkpoints" / "step-000002"
    marker = tmp_path / "marker"
    plant_torch_archive(newest, "engine_state/optimizer.bin", marker)
    refused(case, capsys)
    shutil.rmtree(newest)
    shutil.rmtree(case / "run" / "final")
    result = run(grpo_command(case / "grpo.toml"), cwd=case)
    assert "resumed from run/checkpoints/step-000001 (step 1)" in result.stdout
    assert not marker.exists()
    resumed, reference = weights(case / "run" / "final"), weights(checkpointed / "run" / "final")
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)
    for checkpoint in (case / "run" / "checkpoints").iterdir():
        assert not list((checkpoint / "engine_state").glob("custom_checkpoint_*"))
        assert json.loads((checkpoint / TRAINER_STATE).read_text())["scheduler"]["last_epoch"] == int(
            checkpoint.name.split("-")[1])


# -- a device accelerate cannot give, a step whose loss is not finite, strict metrics ---------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_before_the_model_loads(tiny_hf_dir, prompts, tmp_path, monkeypatch,
                                                                     capsys):
    """accelerate falls back to the CPU without a word, so device = "cuda" trained on the CPU."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model loaded before the device was checked")

    monkeypatch.setattr("mmr1.loading.load_model", load_model)
    config = write_config(tmp_path, tiny_hf_dir, prompts, device="cuda")
    capsys.readouterr()
    assert grpo_main(["--config", str(config)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "config key 'device' is 'cuda'" in lines[0] and "no cuda device" in lines[0], lines
    assert not (tmp_path / "run" / "final").exists()


@pytest.fixture(scope="module")
def diverging_model(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with NaN image-head weights: every image logit, so every loss over images, is NaN."""
    folder = tmp_path_factory.mktemp("nan_model") / "model"
    shutil.copytree(tiny_hf_dir, folder)
    state = weights(folder)
    state["model.generation_head.vision_head.weight"].fill_(float("nan"))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def sft_records(tmp_path_factory) -> Path:
    from mmr1.xcot import format_reasoning

    folder = tmp_path_factory.mktemp("sft_records")
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(folder / "ref.png")
    Image.fromarray(np.full((32, 32, 3), 160, dtype=np.uint8)).save(folder / "target.png")
    write_records(folder / "records.jsonl", [Record(
        id="r", references=(folder / "ref.png",), prompt="photo", target=folder / "target.png",
        reasoning=format_reasoning("a square", "square", "a square on sand"))])
    return folder / "records.jsonl"


@pytest.mark.parametrize("recipe", ["grpo", "sft"])
def test_a_step_whose_loss_is_not_finite_stops_the_run_and_exports_nothing(recipe, diverging_model, prompts,
                                                                          sft_records, tmp_path, capsys,
                                                                          monkeypatch):
    """A NaN loss trained on and was exported as final/; the run now stops at that step with one error line.
    Loading refuses NaN weights and sampling NaN logits (tests/mmr1); both are switched off here, so that the
    step's own check, the last line behind them (overflow in training, say), is what stops the run."""
    import importlib

    monkeypatch.setattr("mmr1.loading.check_finite", lambda *args, **kwargs: None)
    monkeypatch.setattr("mmr1.sampling.check_finite_logits", lambda *args, **kwargs: None)
    output = tmp_path / "run"
    data, extra = (prompts, ["--num_generations", "2", "--max_reasoning_tokens", "4"]) if recipe == "grpo" else (
        sft_records, ["--batch_size", "1"])
    capsys.readouterr()
    code = importlib.import_module(f"training.{recipe}").main(
        ["--model", str(diverging_model), "--data", str(data), "--steps", "2", "--save_every", "1", "--device", "cpu",
         "--output_dir", str(output), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: step 1: the loss is nan") and str(output / "final") in lines[0]
    assert not (output / "final").exists() and not list(output.glob("checkpoints/step-*"))
    assert (output / "metrics.jsonl").read_text() == ""


def test_metrics_are_strict_json_with_null_for_values_that_are_not_finite(prompts, tmp_path):
    """A std over fewer than two valid rewards (or DeepSpeed's grad norm) was written as NaN, which strict JSON
    parsers reject; it is null, and the curves leave a gap there."""
    from training.engine import Run
    from training.plots import plot_curves

    run = Run("grpo", build_config(GRPOConfig, {"model": "m", "data": str(prompts), "device": "cpu",
                                                "output_dir": str(tmp_path / "run")}))
    assert run.output.is_dir()  # made, locked and marked as the run's folder
    for step, std in ((1, float("nan")), (2, 0.5)):
        run.log({"step": step, "reward_mean": 0.1 * step, "reward_std": std, "grad_norm": None})

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.jsonl")

    lines = [json.loads(line, parse_constant=refuse) for line in run.metrics_path.read_text().splitlines()]
    assert [line["reward_std"] for line in lines] == [None, 0.5] and lines[0]["grad_norm"] is None
    assert plot_curves(run.metrics_path, tmp_path / "curves.png", ["reward_mean"]).stat().st_size > 0
