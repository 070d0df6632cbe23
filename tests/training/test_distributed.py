"""The engine paths no CPU runs for real, each as close to the real thing as this machine allows: DeepSpeed's
gradient accumulation (a counting stand-in engine behind accelerate's own wrappers), sampling under ZeRO-3 (a
stand-in for its hooks), and, in two gloo processes, synced stopping and sampling under FSDP 1."""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmr1.xcot import format_reasoning
from tests.training.test_engine import ROOT, run
from training.config import ConfigError, build_config
from training.data import Record, write_records
from training.engine import Run
from training.grpo import GRPOConfig
from training.sft import SFTConfig

ACCELERATE_CONFIGS = ROOT / "training" / "configs" / "accelerate"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """Two records with all that GRPO and SFT read: references, prompt, target and reasoning."""
    folder = tmp_path_factory.mktemp("distributed_data")
    entries = []
    for index, value in enumerate((60, 200)):
        Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(folder / f"ref{index}.png")
        Image.fromarray(np.full((32, 32, 3), 255 - value, dtype=np.uint8)).save(folder / f"target{index}.png")
        entries.append(Record(id=f"r{index}", references=(folder / f"ref{index}.png",), prompt=f"photo {index}",
                              target=folder / f"target{index}.png", subject="square",
                              reasoning=format_reasoning("a square", "square", "a square on sand")))
    write_records(folder / "records.jsonl", entries)
    return folder / "records.jsonl"


# -- DeepSpeed: one engine step per optimizer step -------------------------------------------------------------


class CountingEngine:
    """Stands in for DeepSpeed's engine behind accelerate's DeepSpeedEngineWrapper and behaves as it does there:
    backward scales gradients by 1 / gradient_accumulation_steps, step() clips, updates and zeroes."""

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: list, accumulation_steps: int, clipping: float):
        self.optimizer, self.parameters = optimizer, parameters
        self.accumulation_steps, self.clipping = accumulation_steps, clipping
        self.boundaries: list[bool] = []  # per backward: whether accelerate marked it a boundary
        self.steps = 0
        self.norm = 0.0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.boundary = is_boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.boundaries.append(self.boundary)
        (loss / self.accumulation_steps).backward()

    def step(self) -> None:
        self.steps += 1
        self.norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.clipping))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float:
        return self.norm


def launcher_environment(config_file: Path) -> dict[str, str]:
    """The ACCELERATE_* variables accelerate's own launcher sets for `accelerate launch --config_file`, less
    ACCELERATE_USE_DEEPSPEED (there is no deepspeed here)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "training.grpo"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, environment = prepare_deepspeed_cmd_env(args)
    return {key: value for key, value in environment.items()
            if key.startswith("ACCELERATE_") and key != "ACCELERATE_USE_DEEPSPEED"}


class DeepSpeedPretence:
    """Makes accelerate report DeepSpeed, configured by `plugin`, while `on`. Properties rather than the state's
    fields: accelerate copies the process's own distributed type back into its state whenever it builds one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, plugin):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        self.on = True
        kind, active_plugin = Accelerator.distributed_type.fget, AcceleratorState.deepspeed_plugin.fget
        monkeypatch.setattr(Accelerator, "distributed_type",
                            property(lambda accelerator: DistributedType.DEEPSPEED if self.on else kind(accelerator)))
        monkeypatch.setattr(AcceleratorState, "deepspeed_plugin",
                            property(lambda state: plugin if self.on else active_plugin(state)))


@contextlib.contextmanager
def emulated_deepspeed():
    """Runs started meanwhile are started as `accelerate launch --config_file deepspeed_zero2.yaml` starts them,
    and prepared as accelerate prepares them for DeepSpeed, with a CountingEngine as the engine (checkpoints are
    written by the real, CPU, engine). Yields the engines of those runs."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper, DeepSpeedOptimizerWrapper

    engines: list[CountingEngine] = []
    pretences: list[DeepSpeedPretence] = []
    prepare, write = Run.prepare, Run._write

    def prepare_for_deepspeed(self, policy, loss):
        objective = prepare(self, policy, loss)
        plugin = DeepSpeedPlugin()  # from the launcher's variables
        # as accelerate's _prepare_deepspeed: an "auto" accumulation count is the Accelerator's
        plugin.fill_match("gradient_accumulation_steps", must_match=False,
                          gradient_accumulation_steps=self.accelerator.gradient_accumulation_steps)
        engine = CountingEngine(self.optimizer.optimizer, self.parameters,
                                plugin.get_value("gradient_accumulation_steps"), plugin.gradient_clipping)
        self.accelerator.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(engine)
        self.optimizer = DeepSpeedOptimizerWrapper(self.optimizer.optimizer)
        pretences.append(DeepSpeedPretence(monkeypatch, plugin))
        engines.append(engine)
        return objective

    def write_with_the_cpu_engine(self, *args):
        pretences[-1].on = False
        try:
            return write(self, *args)
        finally:
            pretences[-1].on = True

    with pytest.MonkeyPatch.context() as monkeypatch:
        for key, value in launcher_environment(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml").items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(Run, "prepare", prepare_for_deepspeed)
        monkeypatch.setattr(Run, "_write", write_with_the_cpu_engine)
        yield engines


def grpo_run(tiny_hf_dir, records, output: Path) -> Path:
    from training.grpo import train

    return train(build_config(GRPOConfig, {
        "model": str(tiny_hf_dir), "data": str(records), "output_dir": str(output), "steps": 1,
        "prompts_per_step": 2, "num_iterations": 2, "num_generations": 4, "cfg_scale": 2.0,
        "max_reasoning_tokens": 4, "learning_rate": 1e-3, "beta": 0.0, "device": "cpu", "seed": 5,
    }))


def sft_run(tiny_hf_dir, records, output: Path) -> Path:
    from training.sft import train

    return train(build_config(SFTConfig, {
        "model": str(tiny_hf_dir), "data": str(records), "output_dir": str(output), "steps": 2, "batch_size": 1,
        "gradient_accumulation": 2, "learning_rate": 1e-3, "warmup_steps": 0, "device": "cpu", "seed": 5,
    }))


@pytest.mark.parametrize("train, optimizer_steps", [(grpo_run, 1 * 2), (sft_run, 2)], ids=["grpo", "sft"])
def test_deepspeed_steps_its_engine_once_per_optimizer_step(train, optimizer_steps, tiny_hf_dir, records, tmp_path):
    """GRPO with prompts_per_step = 2 (and num_iterations = 2) and SFT with gradient_accumulation = 2: accelerate
    marks every second backward a boundary, the engine steps there only, and the weights are those of the
    plain run (the learning rate is not multiplied, no group is scored by an already-updated model)."""
    plain = load_file(train(tiny_hf_dir, records, tmp_path / "plain") / "model.safetensors")
    with emulated_deepspeed() as engines:
        emulated = load_file(train(tiny_hf_dir, records, tmp_path / "deepspeed") / "model.safetensors")
    [engine] = engines
    assert engine.steps == optimizer_steps
    assert engine.boundaries == [False, True] * optimizer_steps
    assert engine.accumulation_steps == 2  # DeepSpeed's "auto", filled from the recipe
    start = load_file(tiny_hf_dir / "model.safetensors")
    assert any(not torch.equal(plain[key], start[key]) for key in start)  # it trained
    for key in plain:
        torch.testing.assert_close(emulated[key], plain[key], atol=1e-6, rtol=1e-5)


def test_an_accumulation_count_set_by_accelerate_launch_is_a_config_error(tiny_hf_dir, records, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")  # what `--gradient_accumulation_steps 1` sets
    config = build_config(SFTConfig, {"model": str(tiny_hf_dir), "data": str(records), "device": "cpu",
                                      "output_dir": str(tmp_path / "run"), "gradient_accumulation": 2})
    with pytest.raises(ConfigError, match="accumulates 2 micro-steps"):
        Run("sft", config, accumulation_steps=config.gradient_accumulation)


# -- ZeRO-3: gathered once, hooks off while sampling -----------------------------------------------------------


class Zero3Offload:
    """Stands in for DeepSpeed's DeepSpeedZeRoOffload: hooks around every module's forward that would gather and
    release its parameters (counted here), registered again by `_register_deepspeed_module` as DeepSpeed does."""

    def __init__(self, module: torch.nn.Module, events: list[str]):
        self.module, self.events, self.gathers = module, events, 0
        self.param_coordinator = types.SimpleNamespace(valid=True)
        self.param_coordinator.is_invalid_trace = lambda: not self.param_coordinator.valid
        self.param_coordinator._invalidate_trace = lambda: setattr(self.param_coordinator, "valid", False)
        module.ds_external_parameters = lambda: []
        for parameter in module.parameters():
            parameter.ds_active_sub_modules = {0}
        self._register_deepspeed_module(module)

    def _gather(self, *args) -> None:
        self.gathers += 1

    def _register_deepspeed_module(self, module: torch.nn.Module) -> None:
        self.events.append("hooks on")
        self.forward_hooks = [child.register_forward_pre_hook(self._gather) for child in module.modules()]
        self.backward_hooks = [child.register_forward_hook(self._gather) for child in module.modules()]


def test_zero3_sampling_gathers_once_with_the_hooks_off_and_puts_them_back(tiny_hf_dir, records, tmp_path,
                                                                           monkeypatch):
    """As TRL's unwrap_model_for_generation: all parameters gathered once, the per-module hooks removed while
    sampling runs (so its many forwards gather nothing again), then registered again with the coordinator's trace
    invalidated, before the gathered parameters are released."""
    from accelerate.utils import DeepSpeedPlugin

    from mmr1.generation import generate
    from mmr1.loading import load_model

    events: list[str] = []

    class GatheredParameters:
        def __init__(self, parameters, modifier_rank=None):
            self.count = len(list(parameters))

        def __enter__(self):
            events.append(f"gather {self.count}")

        def __exit__(self, *exception):
            events.append("release")

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(
        zero=types.SimpleNamespace(GatheredParameters=GatheredParameters)))
    mm = load_model(tiny_hf_dir, dtype="fp32", device="cpu")
    expected = generate(mm, "a red square", seed=3).tokens
    offload = Zero3Offload(mm.model, events)
    run = Run("grpo", build_config(GRPOConfig, {"model": str(tiny_hf_dir), "data": str(records), "device": "cpu",
                                                "output_dir": str(tmp_path / "run")}))
    run.objective = types.SimpleNamespace(optimizer=types.SimpleNamespace(parameter_offload=offload),
                                          parameters=mm.model.parameters)
    DeepSpeedPretence(monkeypatch, DeepSpeedPlugin(zero_stage=3))
    with run.generation_weights():
        assert all(not parameter.ds_active_sub_modules for parameter in mm.model.parameters())
        sampled = generate(mm, "a red square", seed=3).tokens
        assert offload.gathers == 0
    assert torch.equal(sampled, expected)
    count = len(list(mm.model.parameters()))
    assert events == ["hooks on", f"gather {count}", "hooks on", "release"]
    assert not offload.param_coordinator.valid
    mm.embed_text(torch.tensor([1]))
    assert offload.gathers > 0  # the hooks are back for training


# -- two gloo processes: synced stopping, FSDP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(tiny_hf_dir, tmp_path_factory) -> list[dict]:
    """What each process of tests/training/distributed_worker.py saw (DDP config, 2 CPU processes over gloo)."""
    out = tmp_path_factory.mktemp("distributed")
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"),
         "--num_processes", "2", "--main_process_port", "29519",
         "-m", "tests.training.distributed_worker", "--model", str(tiny_hf_dir), "--out", str(out)])
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_synced_sampling_keeps_the_processes_stepping_until_all_have_stopped(two_processes):
    """Rows stop after 2 and 3 tokens on one process, 5 and 7 on the other: unsynced, the processes run different
    numbers of forwards (a hang where forwards are collectives); synced, both run as many as the longest, and each
    returns exactly its unsynced result."""
    unsynced = [seen["unsynced"] for seen in two_processes]
    synced = [seen["synced"] for seen in two_processes]
    assert [seen["forwards"] for seen in unsynced] == [3, 7]
    assert [seen["forwards"] for seen in synced] == [7, 7]
    assert [seen["lengths"] for seen in unsynced] == [[2, 3], [5, 7]]
    assert synced == [{**seen, "forwards": 7} for seen in unsynced]


def test_fsdp_sampling_gathers_the_root_unit_only_and_matches_the_unwrapped_model(two_processes):
    """Inside Run.generation_weights under FSDP 1 (decoder layers as units, as fsdp.yaml wraps them) the heads are
    whole while the decoder layers stay sharded and gather themselves in their forwards; reasoning (synced, the
    processes stopping apart) and image tokens equal those of the unwrapped model."""
    for seen in two_processes:
        fsdp = seen["fsdp"]
        assert fsdp["head_weight_dims"] == 2 and fsdp["decoder_weight_dims"] == 1
        assert fsdp["reasoning"] == {**seen["unsynced"], "forwards": 7}
        assert fsdp["image"] == seen["image"]
