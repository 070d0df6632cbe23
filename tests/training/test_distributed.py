"""The engine paths no CPU runs for real, each as close to the real thing as this machine allows: DeepSpeed's
gradient accumulation (a counting stand-in engine behind accelerate's own wrappers), sampling under ZeRO-3 (a
stand-in for its hooks), accelerate's own DeepSpeed preparation of the policy and the KL reference's own engine
(a stand-in deepspeed package), and, in two gloo processes, synced stopping, DDP's gradient buckets, and
sampling and reference scoring under FSDP 1."""

from __future__ import annotations

import contextlib
import copy
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
from training.data import Record, read_records, write_records
from training.engine import Objective, Run
from training.grpo import GRPOConfig, rollout, score_reference
from training.policy import make_policy
from training.rewards import build_rewards
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
    """The ACCELERATE_* and FSDP_* variables accelerate's own launcher sets for `accelerate launch --config_file`
    (they configure its DeepSpeed and FSDP plugins), less the switches that turn those engines on (neither runs
    on this CPU)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "training.grpo"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, environment = prepare_deepspeed_cmd_env(args)
    else:
        environment = prepare_multi_gpu_env(args)
    return {key: value for key, value in environment.items() if key.startswith(("ACCELERATE_", "FSDP_"))
            and key not in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")}


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


# -- DeepSpeed: accelerate's own preparation, and the reference's engine ----------------------------------------


class StandInEngine(torch.nn.Module):
    """Stands in for a DeepSpeedEngine: a Module around `module`. Built without an optimizer (the reference's),
    its optimizer is what ZeRO-3 makes then, the parameter offload, whose coordinator's trace resets it counts."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        super().__init__()
        self.module, self.resets = module, 0
        self.optimizer = optimizer or types.SimpleNamespace(param_coordinator=types.SimpleNamespace(
            reset_step=lambda: setattr(self, "resets", self.resets + 1)))


class StandInDeepSpeed:
    """Stands in for the deepspeed package where accelerate's _prepare_deepspeed and Run.prepare_reference call
    it: `initialize` records the model and config of each call and returns a StandInEngine."""

    def __init__(self):
        self.calls: list[tuple[torch.nn.Module, dict]] = []

    def initialize(self, model, optimizer=None, config=None, config_params=None, **ignored):
        self.calls.append((model, copy.deepcopy(config if config is not None else config_params)))
        return StandInEngine(model, optimizer), optimizer, None, None


@pytest.fixture(params=["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def deepspeed_prepared(request, tiny_hf_dir, records, tmp_path, monkeypatch):
    """A GRPO run with beta > 0 launched with one of the DeepSpeed yamls, its policy prepared by accelerate's own
    _prepare_deepspeed, deepspeed.initialize being the stand-in's. accelerate imports its DeepSpeed wrappers only
    where deepspeed is installed (here they are given to it as it would import them), and the stand-in has no
    package metadata (accelerate's version checks of it answer no)."""
    import accelerate.accelerator
    import accelerate.utils.deepspeed
    from accelerate.utils import DeepSpeedPlugin

    from mmr1.loading import load_model

    for key, value in launcher_environment(ACCELERATE_CONFIGS / request.param).items():
        monkeypatch.setenv(key, value)
    deepspeed = StandInDeepSpeed()
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    for name in ("DeepSpeedEngineWrapper", "DeepSpeedOptimizerWrapper", "DeepSpeedSchedulerWrapper", "DummyOptim",
                 "DummyScheduler"):
        monkeypatch.setattr(accelerate.accelerator, name, getattr(accelerate.utils.deepspeed, name),
                            raising=False)
    compare_versions = accelerate.accelerator.compare_versions
    monkeypatch.setattr(accelerate.accelerator, "compare_versions",
                        lambda library, *args: library != "deepspeed" and compare_versions(library, *args))
    config = build_config(GRPOConfig, {"model": str(tiny_hf_dir), "data": str(records), "device": "cpu",
                                       "output_dir": str(tmp_path / "run"), "num_generations": 2, "cfg_scale": 2.0,
                                       "max_reasoning_tokens": 4, "beta": 0.02})
    run = Run("grpo", config)
    run.accelerator.deepspeed_engine_wrapped = None  # as Accelerator.__init__ starts a DeepSpeed run
    plugin = DeepSpeedPlugin()  # from the launcher's variables
    DeepSpeedPretence(monkeypatch, plugin)
    mm = load_model(tiny_hf_dir, dtype="fp32", device="cpu")
    policy = make_policy(mm, tiny_hf_dir, None, with_reference=True)
    run.prepare(policy, loss=None)
    return types.SimpleNamespace(run=run, policy=policy, deepspeed=deepspeed, plugin=plugin, config=config,
                                 stage=plugin.zero_stage)


def test_deepspeed_prepare_takes_one_group_per_micro_step(deepspeed_prepared):
    """The yamls leave train_micro_batch_size_per_gpu "auto", which accelerate fills from a dataloader; the
    recipes pass none, so accelerate's prepare would raise before deepspeed.initialize. A micro-step is one
    group: 1, and the batch is 1 x accumulation steps x processes."""
    [(model, prepared)] = deepspeed_prepared.deepspeed.calls
    assert isinstance(model, Objective)
    assert prepared["train_micro_batch_size_per_gpu"] == 1
    assert prepared["train_batch_size"] == prepared["gradient_accumulation_steps"] == 1
    assert prepared["zero_optimization"]["stage"] == deepspeed_prepared.stage
    assert isinstance(deepspeed_prepared.run.objective, StandInEngine)


def test_deepspeed_reference_gets_its_own_engine_as_in_trl(deepspeed_prepared, records):
    """As TRL's prepare_deepspeed: deepspeed.initialize on the reference with a copy of the prepared config,
    ZeRO-3 kept (sharded too, buckets from the hidden size) and any other stage made 0 (a replicated copy); the
    engine comes back in eval mode, and scoring runs on its module (ZeRO-3: each block one trace of the hooks),
    with the log-probs of the unwrapped reference."""
    run, policy, deepspeed = deepspeed_prepared.run, deepspeed_prepared.policy, deepspeed_prepared.deepspeed
    config = deepspeed_prepared.config
    names = ("reasoning", "image")
    group = rollout(policy.mm, read_records(records)[0], config, build_rewards(config.rewards), seeds=(1, 2))
    score_reference(policy, group, names)
    expected = {name: group.segments[name].reference_logprobs for name in names}

    plain = policy.reference_model
    policy.reference_model = engine = run.prepare_reference(plain)
    model, reference_config = deepspeed.calls[-1]
    assert len(deepspeed.calls) == 2 and model is plain
    zero = reference_config["zero_optimization"]
    hidden = plain.config.text_config.hidden_size
    buckets = {"reduce_bucket_size": hidden**2, "stage3_param_persistence_threshold": 10 * hidden,
               "stage3_prefetch_bucket_size": int(0.9 * hidden**2)}
    if deepspeed_prepared.stage == 3:
        assert zero["stage"] == 3 and buckets.items() <= zero.items()
    else:
        assert zero["stage"] == 0 and not buckets.keys() & zero.keys()
    assert reference_config["train_micro_batch_size_per_gpu"] == 1
    assert deepspeed_prepared.plugin.deepspeed_config["zero_optimization"]["stage"] == deepspeed_prepared.stage
    assert isinstance(engine, StandInEngine) and engine.module is plain and not engine.training

    with policy.reference() as reference:
        assert reference.model is plain
    score_reference(policy, group, names)
    for name in names:
        assert torch.equal(group.segments[name].reference_logprobs, expected[name])
    assert engine.resets == (2 if deepspeed_prepared.stage == 3 else 0)


# -- two gloo processes: synced stopping, DDP's buckets, FSDP ----------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(tiny_hf_dir, tmp_path_factory) -> list[dict]:
    """What each process of tests/training/distributed_worker.py saw (DDP config, 2 CPU processes over gloo),
    with the FSDP plugin's variables of fsdp.yaml passed on, but sync_module_states off: FSDP refuses it for
    modules on the CPU (it broadcasts from GPU memory)."""
    out = tmp_path_factory.mktemp("distributed")
    with pytest.MonkeyPatch.context() as monkeypatch:
        for key, value in launcher_environment(ACCELERATE_CONFIGS / "fsdp.yaml").items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
        run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(ACCELERATE_CONFIGS / "ddp.yaml"), "--num_processes", "2", "--main_process_port", "29519",
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


def test_ddp_gradients_are_views_of_the_reducers_buckets(two_processes):
    """gradient_as_bucket_view: after a synchronised backward the gradients of the 21 trained tensors share the
    storage of the reducer's one bucket (the tiny model fits in it), instead of each holding a copy of its own."""
    for seen in two_processes:
        assert seen["ddp_gradients"] == {"gradients": 21, "storages": 1}


def test_fsdp_shards_the_reference_and_scores_as_the_unwrapped_one(two_processes):
    """Run.prepare_reference under FSDP 1 (fsdp.yaml's plugin): the reference's decoder weights are flat 1-D
    shards, half on each process, and so is its root unit outside scoring; inside Policy.reference() the root
    unit is whole and the bare model is handed on; the log-probs scored inside Run.generation_weights, as the
    trainer scores, equal those of the unwrapped reference (top-k 8 sampling, untruncated KL distributions)."""
    full = two_processes[0]["reference_decoder_numel"]
    shards = [seen["fsdp"]["reference_outside"]["decoder_numel"] for seen in two_processes]
    assert sum(shards) == full and all(shard == full // 2 for shard in shards)
    for seen in two_processes:
        fsdp = seen["fsdp"]
        assert fsdp["reference_outside"] == {"head_weight_dims": 1, "decoder_weight_dims": [1],
                                             "decoder_numel": full // 2, "training": False}
        assert fsdp["reference_inside"] == {"model_is_the_wrapped_module": True, "head_weight_dims": 2,
                                            "decoder_weight_dims": 1}
        for name, unwrapped in seen["reference_logprobs"].items():
            torch.testing.assert_close(torch.tensor(fsdp["reference_logprobs"][name]), torch.tensor(unwrapped),
                                       atol=1e-6, rtol=0)
            assert torch.tensor(unwrapped).isfinite().all()
    assert two_processes[0]["reference_logprobs"] != two_processes[1]["reference_logprobs"]  # each its own group
