"""What SFT and GRPO share around their step, on accelerate: processes and devices (one process, DDP, FSDP or
DeepSpeed, chosen by `accelerate launch`), mixed precision, the objective module the engine wraps, the optimizer
and its schedule, resumable checkpoints, metrics and exports.

Layout of a run's `output_dir`:

    mmr1_run.json              written first: this folder is a run of this kit, of the recipe it names
    mmr1_run.lock              flock'ed while a run writes here (a second run at once is refused)
    metrics.jsonl              one JSON line per logged step
    checkpoints/step-000020/   a folder mmr1 loads (model or LoRA adapter, processor, mmr1_training.json)
        engine_state/          optimizer, RNG states and model as accelerate saves them
        trainer_state.json     step, data position and learning-rate schedule
    final/                     the last step's export, without the engine state
    samples/step-000020.png    sample grids (GRPO), curves.png at the end

A run writes only into a new or empty folder or a run of its recipe, and removes only what it wrote there (see
training/checkpoints.py). A run started again with the same output_dir resumes from its newest checkpoint
(`resume = true`; from the older one kept when the newest is torn), and the result is the same as a run that was
never interrupted. A resume reads only JSON, safetensors and torch archives of tensors and plain data
(`check_code_free`), so a run folder someone else prepared cannot run code.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import json
import math
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmr1.errors import MMR1Error
from mmr1.ranges import Range
from mmr1.xcot import SUBJECT_SOURCES

from .checkpoints import (CorruptCheckpoint, FolderLock, RunFolderError, check_code_free, check_complete,
                          claim_run_folder, publish, remove_leftovers, retire, temporary_name)
from .config import (AT_LEAST_ONE, AT_LEAST_ZERO, POSITIVE, PROBABILITY, ConfigError, check_knobs, config_to_dict,
                     knob)
from .data import RecordOrder
from .memory import engine_kind
from .plots import plot_curves
from .policy import LORA_TARGETS, LoraSettings, Policy

TRAINER_STATE = "trainer_state.json"
ENGINE_STATE = "engine_state"
# Keys that may change between a run and its resumption without changing what it computes (output_dir: the run
# folder moved; the checkpoints found in it are the run's).
RESUMABLE_CHANGES = {"steps", "log_every", "save_every", "sample_every", "keep_checkpoints", "resume", "device",
                     "output_dir"}
CHECKPOINT_NAME = re.compile(r"step-(\d{6,})")
# What a run writes with a hidden twin (temporary_name, publish, retire), whose leftovers it removes.
LEFTOVERS_IN_CHECKPOINTS, LEFTOVERS_IN_OUTPUT = r"step-\d{6,}", r"final|metrics\.jsonl|mmr1_run\.json"
TRAINING_SEEDS = Range(0, 2**32 - 1, note="accelerate's set_seed seeds numpy, which takes 32 bits")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "npu")  # accelerate gives each process its index
LR_SCHEDULER_TYPES = ("constant", "cosine")  # transformers' / TRL's lr_scheduler_type names


def learning_rate_factor(step: int, warmup_steps: int, steps: int, scheduler_type: str, floor: float = 0.0) -> float:
    """The peak learning rate's multiplier after `step` optimizer steps: linear warmup, then constant or cosine
    (down to `floor` at the last step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler_type == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class RunConfig:
    """Knobs every recipe has; each recipe's config adds its own after these."""

    model: Path = knob(None, "Janus checkpoint folder to start from (any layout mmr1 loads)")
    data: Path = knob(None, "JSONL records; see training/data.py")
    output_dir: Path = knob(Path("runs/train"), "checkpoints, metrics.jsonl, samples and curves.png go here")
    steps: int = knob(100, "optimizer steps", within=AT_LEAST_ONE)
    learning_rate: float = knob(1e-5, "AdamW peak learning rate", within=AT_LEAST_ZERO)
    warmup_steps: int = knob(0, "linear learning-rate warmup steps", within=AT_LEAST_ZERO)
    lr_scheduler_type: str = knob("constant", "learning rate after warmup: constant, or cosine (half a cosine down to "
                                              "0 at the last step, as transformers' cosine schedule; it follows "
                                              "`steps`)", choices=LR_SCHEDULER_TYPES)
    weight_decay: float = knob(0.0, "AdamW weight decay", within=AT_LEAST_ZERO)
    max_grad_norm: float = knob(1.0, "gradient clipping norm (0 disables)", within=Range(0.0, note="0 disables"))
    lora_rank: int = knob(0, "LoRA rank on the language model's projections (0: full fine-tune)", within=AT_LEAST_ZERO)
    lora_alpha: float = knob(16.0, "LoRA alpha (scale alpha/rank)", within=POSITIVE)
    lora_dropout: float = knob(0.0, "LoRA dropout", within=PROBABILITY)
    lora_targets: tuple[str, ...] = knob(LORA_TARGETS, "language-model module names that get LoRA adapters",
                                         choices=LORA_TARGETS)
    subject_source: str = knob("reference", f"visual intermediate in the chain, one of {SUBJECT_SOURCES}: the first "
                                            "reference's VQ tokens, none, or the subject drawn by the model after "
                                            "its reasoning (SFT data then needs subject_image)",
                               choices=SUBJECT_SOURCES)
    dtype: str = knob("fp32", "fp32, or bf16 (autocast with fp32 master weights, accelerate mixed precision)",
                      choices=("fp32", "bf16"))
    gradient_checkpointing: bool = knob(True, "recompute each decoder layer's activations in backward: a GRPO "
                                              "group's 2G long rows otherwise hold L layers of activations")
    device: str | None = knob(None, "'cpu' forces the CPU; otherwise accelerate picks each process's device",
                              choices=DEVICE_TYPES)
    seed: int = knob(0, "seed of data order, sampling and initialisation", within=TRAINING_SEEDS)
    log_every: int = knob(1, "steps between metrics lines", within=AT_LEAST_ONE)
    save_every: int = knob(0, "steps between resumable checkpoints (0: only at the end)", within=AT_LEAST_ZERO)
    sample_every: int = knob(0, "steps between sample grids in samples/ (GRPO: a group's rollouts with their "
                                "rewards; SFT: the first 4 records) (0: never)", within=AT_LEAST_ZERO)
    keep_checkpoints: int = knob(2, "newest resumable checkpoints kept (older ones are deleted)", within=AT_LEAST_ONE)
    resume: bool = knob(True, "continue from the newest checkpoint in output_dir when there is one")

    def check_run_keys(self) -> None:
        """The checks every recipe shares (every knob's rule, the required folders); recipes call it from
        __post_init__."""
        check_knobs(self)
        for name in ("model", "data"):
            if getattr(self, name) is None:
                raise ValueError(f"config key {name!r} is required")
        if self.output_dir is None or Path(self.output_dir) == Path("."):
            raise ValueError(f"config key 'output_dir' is {str(self.output_dir or '')!r}, the current directory; a "
                             "run writes checkpoints/, final/ and metrics.jsonl there, so name a folder of its own "
                             "(e.g. runs/sft)")
        if self.lora_rank and not self.lora_targets:
            raise ValueError(f"config key 'lora_targets' is empty; LoRA needs some of {LORA_TARGETS}")

    @property
    def lora(self) -> LoraSettings | None:
        if not self.lora_rank:
            return None
        return LoraSettings(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)


class Objective(torch.nn.Module):
    """The trainable model with the recipe's loss as its forward, so DDP, FSDP and DeepSpeed see one module whose
    forward computes everything that is differentiated (they synchronise and shard around forward calls)."""

    def __init__(self, model: torch.nn.Module, loss: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, *args, **kwargs):
        return self.loss(*args, **kwargs)


def zero3_parameter_offload(engine):
    """The part of a ZeRO-3 engine whose hooks gather each module's parameters around its forward."""
    return getattr(engine.optimizer, "parameter_offload", engine.optimizer)


def remove_zero3_hooks(engine) -> None:
    """Take ZeRO-3's per-module gather and release hooks off, as TRL's `remove_hooks` does before generate."""
    offload = zero3_parameter_offload(engine)
    module = offload.module
    for parameter in itertools.chain(module.parameters(), (p for _, p in module.ds_external_parameters())):
        parameter.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def add_zero3_hooks(engine) -> None:
    """Put them back, as TRL's `add_hooks` does (DeepSpeed >= 0.16.4): the parameter coordinator's trace of the
    training forward no longer holds after sampling's forwards, so it is invalidated first."""
    offload = zero3_parameter_offload(engine)
    coordinator = getattr(offload, "param_coordinator", None)  # ZeRO-3 only
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()
    offload._register_deepspeed_module(offload.module)


class DivergedError(MMR1Error):
    """A step's loss is not finite: the run stops there, before that step is checkpointed or exported."""


def require_training_extras() -> None:
    """Fail before anything loads, not after training, when the train extra is missing."""
    missing = [name for name in ("accelerate", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise MMR1Error(f"Training needs {' and '.join(missing)}: pip install -e '.[train]'")


class Run:
    """One training run: see the module docstring for what it writes."""

    def __init__(self, recipe: str, config: RunConfig, accumulation_steps: int = 1):
        """`accumulation_steps`: the micro-steps of one optimizer step (GRPO's prompts_per_step, SFT's
        gradient_accumulation); accelerate and DeepSpeed synchronise and step on the last of them only."""
        require_training_extras()
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.recipe, self.config = recipe, config
        self.output = Path(config.output_dir)
        self.checkpoints = self.output / "checkpoints"
        self.metrics_path = self.output / "metrics.jsonl"
        self.accelerator = Accelerator(
            cpu=config.device == "cpu",
            mixed_precision="bf16" if config.dtype == "bf16" else "no",
            gradient_accumulation_steps=accumulation_steps,
            # Image steps leave the text head unused and reasoning steps the image head. Gradients as views of
            # the reducer's buckets: otherwise DDP keeps a second full copy of them (26 GiB at 7B in fp32).
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, gradient_as_bucket_view=True)],
        )
        if self.accelerator.gradient_accumulation_steps != accumulation_steps:  # `accelerate launch` overrides it
            raise ConfigError(
                f"accelerate launch sets gradient_accumulation_steps = {self.accelerator.gradient_accumulation_steps}"
                f", but this {recipe} run accumulates {accumulation_steps} micro-steps per optimizer step (its config"
                " decides); leave gradient_accumulation_steps out of the accelerate config and command line."
            )
        self._check_device()
        self.folder_lock = self._claim_folder()
        try:
            self.latest = self._check_resumable()  # before any model loads: a mismatch is a config error
        except BaseException:
            self.release_folder()
            raise
        set_seed(config.seed)
        self.policy: Policy | None = None
        self.objective: torch.nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    # -- set-up -------------------------------------------------------------------------------------------------

    def _check_device(self) -> None:
        """Refuse a `device` that accelerate could not give this process (it falls back to the CPU silently, so
        `device = "cuda"` without CUDA would train on the CPU), before any model loads."""
        wanted = self.config.device
        if wanted is not None and self.device.type != wanted:
            raise ConfigError(f"config key 'device' is {wanted!r}, but this torch sees no {wanted} device (accelerate "
                              f"would run this process on {self.device}); install a torch build for {wanted}, or "
                              "set device = \"cpu\" or leave it unset.")

    def _claim_folder(self) -> FolderLock | None:
        """The main process checks, locks and marks output_dir (`claim_run_folder`) before anything else reads or
        writes it; the others learn its verdict, so that every process refuses alike instead of waiting at a
        barrier for a main process that has gone. Returns the lock (None on the other processes)."""
        from accelerate.utils import broadcast_object_list

        lock, problem = None, None
        if self.is_main:
            try:
                lock = claim_run_folder(self.output, self.recipe)
            except RunFolderError as error:
                problem = str(error)
        if self.num_processes > 1:
            [problem] = broadcast_object_list([problem])
        if problem is not None:
            if torch.distributed.is_initialized():  # every process ends here: leave the group before exiting, or
                torch.distributed.destroy_process_group()  # gloo's threads can abort the interpreter's exit
            raise RunFolderError(problem)
        return lock

    def release_folder(self) -> None:
        """Let another run write into output_dir (the end of the run; a killed run's lock goes with it)."""
        if self.folder_lock is not None:
            self.folder_lock.release()

    def _checkpoint_folders(self) -> list[Path]:
        """checkpoints/step-N by step (names sort wrongly past 6 digits)."""
        found = self.checkpoints.iterdir() if self.checkpoints.is_dir() else ()
        named = [(int(match[1]), path) for path in found if (match := CHECKPOINT_NAME.fullmatch(path.name))]
        return [path for _, path in sorted(named)]

    def _check_resumable(self) -> Path | None:
        """The checkpoint a resume starts from: the newest whole one (a torn one is passed over with a warning),
        of this recipe and config, at a step within `steps`; None for a new run."""
        folders = self._checkpoint_folders()
        if not folders:
            return None
        if not self.config.resume:
            raise ConfigError(f"output_dir {self.output} already holds checkpoints of a run; set resume = true to "
                              "continue it, or choose another output_dir.")
        corrupt: list[CorruptCheckpoint] = []
        for folder in reversed(folders):
            try:
                saved = self._read_checkpoint(folder)
            except CorruptCheckpoint as error:
                corrupt.append(error)
                continue
            if self.is_main:
                for error in corrupt:
                    print(f"warning: {error}; resuming from the older {folder}", file=sys.stderr)
            self._check_same_run(folder, saved)
            self._metrics_lines(warn=False)  # corruption is refused now, before any model loads
            return folder
        raise ConfigError(f"every checkpoint in {self.checkpoints} is corrupt: {'; '.join(map(str, corrupt))}. Delete "
                          f"{self.checkpoints} to start this run over, or choose another output_dir.")

    def _read_checkpoint(self, folder: Path) -> dict:
        """`folder`'s trainer state, once its engine state is known whole (CorruptCheckpoint otherwise: a torn file,
        which an older checkpoint can stand in for) and free of code (ConfigError otherwise: refused)."""
        path = folder / TRAINER_STATE
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            missing = [key for key in ("step", "order", "recipe", "config") if key not in saved]
            if missing or not isinstance(saved["config"], dict):
                raise KeyError(f"it lacks {missing or ['config']}")
            saved["step"] = int(saved["step"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CorruptCheckpoint(f"checkpoint {folder} is corrupt: {path} is unreadable "
                                    f"({type(error).__name__}: {error})") from error
        check_complete(folder / ENGINE_STATE)
        self._check_engine_state(folder, saved)
        return saved

    def _check_same_run(self, folder: Path, saved: dict) -> None:
        """Refuse to resume `folder` under another recipe or config, or past the configured `steps` (its weights
        would be exported as final/ of a shorter run)."""
        changed = self._changed_keys(saved)
        if saved["recipe"] != self.recipe or changed:
            raise ConfigError(f"output_dir {self.output} holds a {saved['recipe']} run whose config differs in "
                              f"{changed or ['recipe']}; resume it with the same config or choose another output_dir.")
        step = saved["step"]  # an int: _read_checkpoint checked it
        if step > self.config.steps:
            raise ConfigError(f"config key 'steps' is {self.config.steps}, but checkpoint {folder} is at step {step}: "
                              f"a resume would export step {step}'s weights as final/ of a {self.config.steps}-step "
                              f"run. Set steps = {step} or more to finish or extend this run, or choose another "
                              "output_dir.")

    def _changed_keys(self, saved: dict) -> list[str]:
        """Config keys that differ from the checkpoint's, paths compared as the folders they name (a relative and
        an absolute spelling of one folder are the same; the saved ones resolved where the run started)."""
        current = json.loads(json.dumps(config_to_dict(self.config)))  # tuples as the saved lists
        resolved = saved.get("resolved_paths", {})

        def same(key: str) -> bool:
            old, new = saved["config"].get(key), current.get(key)
            if old == new:
                return True
            return (isinstance(getattr(self.config, key, None), Path) and isinstance(old, str)
                    and Path(resolved.get(key, old)).resolve() == Path(new).resolve())

        return sorted(key for key in set(saved["config"]) | set(current) if key not in RESUMABLE_CHANGES
                      and not same(key))

    def _resolved_paths(self) -> dict[str, str]:
        return {field: str(Path(value).resolve()) for field, value in vars(self.config).items()
                if isinstance(value, Path)}

    def _check_engine_state(self, folder: Path, saved: dict) -> None:
        """Refuse, before any model loads, a checkpoint whose resume could run code: accelerate loads the states
        of registered objects (custom_checkpoint_*.pkl, the schedule's before this kit kept it in JSON) with
        weights_only=False, and every other pickle must pass `check_code_free`."""
        pickled = sorted((folder / ENGINE_STATE).glob("custom_checkpoint_*.pkl"))
        if pickled or "scheduler" not in saved:
            found = f"holds {pickled[0].relative_to(folder)}" if pickled else f"has no schedule in {TRAINER_STATE}"
            raise ConfigError(f"checkpoint {folder} {found}: earlier versions of this kit kept the schedule in a "
                              "pickle that accelerate loads with weights_only=False, which can run code, so it is not "
                              "resumed. Choose another output_dir (with model = that checkpoint to continue from its "
                              "weights).")
        check_code_free(folder / ENGINE_STATE)

    def prepare(self, policy: Policy, loss: Callable[..., Any]) -> torch.nn.Module:
        """Wrap the policy's model and `loss` for the engine; build the optimizer and the warmup schedule."""
        self.policy = policy
        config = self.config
        if config.gradient_checkpointing:
            # Non-reentrant: with LoRA the layers' inputs need no gradient, and reentrant checkpoints would cut them off.
            policy.mm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        parameters = [p for p in policy.mm.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        # Not prepared: accelerate would step a prepared scheduler once per process. Nor registered for accelerate's
        # checkpoints, which unpickle with weights_only=False: its state goes into trainer_state.json.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, config.steps, config.lr_scheduler_type)
        )
        if engine_kind(self.accelerator).startswith("zero"):
            plugin = self.accelerator.state.deepspeed_plugin
            if plugin.is_auto("train_micro_batch_size_per_gpu"):
                # accelerate takes "auto" from a dataloader, and the recipes pass none: a micro-step is one group
                # (GRPO) or one batch (SFT).
                plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        self.objective, self.optimizer = self.accelerator.prepare(Objective(policy.mm.model, loss), optimizer)
        self.parameters = parameters
        return self.objective

    def prepare_reference(self, module: torch.nn.Module) -> torch.nn.Module:
        """The frozen KL reference laid out as TRL's GRPOTrainer lays out its ref_model, so that a sharding engine
        shards it too: FSDP wraps it as it wraps the policy (TRL's prepare_fsdp); ZeRO-3 shards it with buckets
        sized from the hidden size, other DeepSpeed stages keep a replicated stage-0 copy (prepare_deepspeed);
        DDP and one process keep it as it is. Called after `prepare`, whose processed DeepSpeed config it copies;
        the policy then opens it through `reference_weights`."""
        if self.policy is None:
            raise RuntimeError("prepare the policy before its reference: the reference copies the engine's set-up")
        kind = engine_kind(self.accelerator)
        if kind == "fsdp":
            module = self._fsdp_reference(module)
        elif kind.startswith("zero"):
            module = self._deepspeed_reference(module)
        else:
            module = module.to(self.device)
        self.policy.open_reference = self.reference_weights
        return module.eval()

    def _fsdp_reference(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        plugin = self.accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 1:
            raise ConfigError("FSDP runs take fsdp_version: 1 (training/configs/accelerate/fsdp.yaml): sampling and "
                              "the reference gather FSDP 1's root unit.")
        plugin.set_auto_wrap_policy(module)  # the decoder layers become units, as in the policy
        return FullyShardedDataParallel(
            module, sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload, auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy, sync_module_states=plugin.sync_module_states,
            backward_prefetch=plugin.backward_prefetch, forward_prefetch=plugin.forward_prefetch,
            use_orig_params=plugin.use_orig_params, param_init_fn=plugin.param_init_fn,
            ignored_modules=plugin.ignored_modules, limit_all_gathers=plugin.limit_all_gathers, device_id=self.device,
        )

    def _deepspeed_reference(self, module: torch.nn.Module) -> torch.nn.Module:
        """TRL's bucket settings go into zero_optimization itself (TRL writes them as top-level dotted keys, which
        DeepSpeed does not read), from the language model's hidden size (JanusConfig has no top-level one)."""
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        zero = config["zero_optimization"]
        if zero["stage"] == 3:
            hidden = module.config.text_config.hidden_size
            zero.update(reduce_bucket_size=hidden * hidden, stage3_param_persistence_threshold=10 * hidden,
                        stage3_prefetch_bucket_size=int(0.9 * hidden * hidden))
        else:
            zero["stage"] = 0
        engine, *_ = deepspeed.initialize(model=module, config=config)
        return engine

    def resume(self, order: RecordOrder) -> int:
        """Restore the newest checkpoint (engine state, data position) when there is one; returns its step."""
        if self.is_main:
            leftovers = remove_leftovers(self.output, LEFTOVERS_IN_OUTPUT)
            if self.checkpoints.is_dir():
                leftovers += remove_leftovers(self.checkpoints, LEFTOVERS_IN_CHECKPOINTS)
            for leftover in leftovers:
                print(f"removed {leftover.name}, left by an interrupted run")
        self.accelerator.wait_for_everyone()
        if self.latest is None:
            if self.is_main:
                self.output.mkdir(parents=True, exist_ok=True)
                self.metrics_path.write_text("", encoding="utf-8")
            return 0
        self.accelerator.load_state(str(self.latest / ENGINE_STATE))
        state = json.loads((self.latest / TRAINER_STATE).read_text(encoding="utf-8"))
        self.scheduler.load_state_dict(state["scheduler"])
        order.load_state_dict(state["order"])
        step = int(state["step"])
        if self.is_main:
            self._truncate_metrics(step)
            print(f"resumed from {self.latest} (step {step})")
        return step

    def _truncate_metrics(self, step: int) -> None:
        """Drop the lines an interrupted run logged after its last checkpoint, so every step is logged once."""
        kept = [line for line_step, line in self._metrics_lines(warn=True) if line_step <= step]
        temporary = self.metrics_path.with_name(".metrics.jsonl.tmp")
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        temporary.replace(self.metrics_path)

    def _metrics_lines(self, warn: bool) -> list[tuple[int, str]]:
        """(step, line) of each line of metrics.jsonl. A last line that does not parse is one a crash tore while
        writing it: dropped (with a warning if `warn`). Any other is refused: something else wrote into the file."""
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines() if self.metrics_path.exists() else []
        numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
        parsed = []
        for number, line in numbered:
            try:
                parsed.append((int(json.loads(line)["step"]), line))
            except (ValueError, KeyError, TypeError) as error:
                if number != numbered[-1][0]:
                    raise ConfigError(f"{self.metrics_path} line {number} is not a metrics line ({error}); only the "
                                      "last line can be torn by a crash. Delete that line, or choose another "
                                      "output_dir.") from error
                if warn:
                    print(f"warning: dropped the torn last line {number} of {self.metrics_path} (a crash while writing "
                          "it)", file=sys.stderr)
        return parsed

    # -- the step -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def micro_step(self, last: bool):
        """Context for one forward and backward of a step's `accumulation_steps` micro-steps, in accelerate's own
        accumulation: gradients synchronise, and DeepSpeed steps its engine, on the last only (`no_sync` alone
        leaves DeepSpeed stepping at every backward)."""
        with self.accelerator.accumulate(self.objective):
            if self.accelerator.sync_gradients != last:
                raise RuntimeError(f"an optimizer step must take exactly accumulation_steps = "
                                   f"{self.accelerator.gradient_accumulation_steps} micro-steps")
            yield

    @contextlib.contextmanager
    def generation_weights(self):
        """Weights to sample with, gathered as TRL's GRPOTrainer gathers them for generate. FSDP: the root unit's
        parameters only (all but the decoder layers), since the wrapped decoder layers gather theirs in their own
        forward; a recursive summon would hold the whole model gathered, and torch does not support forwards inside
        it. ZeRO-3: all of them, with the engine's per-module gather hooks off meanwhile, so that sampling's many
        small forwards do not gather and release every layer again."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind == DistributedType.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(self.objective, recurse=False, writeback=False):
                yield
        elif kind == DistributedType.DEEPSPEED and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.objective.parameters()), modifier_rank=None):
                remove_zero3_hooks(self.objective)
                try:
                    yield
                finally:
                    add_zero3_hooks(self.objective)
        else:
            yield

    @contextlib.contextmanager
    def reference_weights(self, reference: torch.nn.Module):
        """The bare model of `reference` (as `prepare_reference` made it), usable inside the block by its inner
        modules: scoring calls the embeddings, aligner, decoder and heads, never the root forward that FSDP and
        DeepSpeed gather around. FSDP: the root unit's parameters gathered, as in `generation_weights` (the
        decoder layers gather theirs in their forwards). DeepSpeed: the engine's module; under ZeRO-3 its hooks
        gather each submodule around its forward, and each block counts as one forward of its trace (reset as
        its start-of-forward hook would, which the inner calls never run)."""
        kind = engine_kind(self.accelerator)
        if kind == "fsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(reference, recurse=False, writeback=False):
                yield reference.module
        elif kind.startswith("zero"):
            if kind == "zero3":
                zero3_parameter_offload(reference).param_coordinator.reset_step()
            yield reference.module
        else:
            yield reference

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is this micro-step's share of the step's loss (the recipes divide by the micro-step count);
        accelerate (DeepSpeed: its engine) divides by accumulation_steps again, so it is scaled back first."""
        self.accelerator.backward(loss * self.accelerator.gradient_accumulation_steps)

    def check_loss(self, step: int, loss: float) -> None:
        """Stop at a step whose loss is not finite on any process (every process stops alike), before the optimizer
        applies its gradients and before anything is saved: NaN weights would otherwise train on, be checkpointed
        and exported. Under DeepSpeed the engine has stepped in backward already; the run still stops unsaved."""
        losses = self.gather(torch.tensor([loss], dtype=torch.float64))
        if not torch.isfinite(losses).all():
            bad = next(float(value) for value in losses if not math.isfinite(float(value)))
            raise DivergedError(f"step {step}: the loss is {bad}, so training stops before applying this step; "
                                f"nothing is exported to {self.output / 'final'} (checkpoints of earlier steps stay "
                                f"in {self.checkpoints}). Check the model's weights and the data, or lower "
                                "learning_rate.")

    def optimizer_step(self) -> float | None:
        """Clip, step, schedule, zero; returns the gradient norm before clipping (0 when clipping is off, None under
        DeepSpeed, which clips inside its engine)."""
        norm = 0.0
        if self.config.max_grad_norm:
            clipped = self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
            norm = None if clipped is None else float(clipped)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """`values` of every process, concatenated (on the CPU)."""
        return self.accelerator.gather(values.to(self.device)).cpu()

    def log_due(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step in (1, self.config.steps)

    def samples_due(self, step: int) -> bool:
        """Whether a sample grid is due: every process draws it (under FSDP and ZeRO-3 its forwards are
        collectives), the main one writes it (`save_samples`)."""
        return bool(self.config.sample_every) and step % self.config.sample_every == 0

    def save_samples(self, step: int, grid) -> None:
        if self.is_main:
            (self.output / "samples").mkdir(exist_ok=True)
            grid.save(self.output / "samples" / f"step-{step:06d}.png")

    def log(self, line: dict) -> None:
        """Append `line` to metrics.jsonl as strict JSON: a value that is not a finite number (a std over fewer
        than two valid rewards) is written as null, never as NaN, which strict parsers reject."""
        if self.is_main:
            values = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                      for key, value in line.items()}
            with self.metrics_path.open("a", encoding="utf-8") as metrics:
                metrics.write(json.dumps(values, allow_nan=False) + "\n")

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _record(self, step: int) -> dict:
        return {"recipe": self.recipe, "step": step, "config": config_to_dict(self.config)}

    def _write(self, destination: Path, step: int, fill_engine: Callable[[Path], None] | None) -> Path:
        """Fill `destination` in its temporary twin on every process, then let the main process publish it."""
        temporary = temporary_name(destination)
        if self.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if fill_engine is not None:
            fill_engine(temporary)
        state = self.accelerator.get_state_dict(self.objective)  # gathered on the main process (FSDP, ZeRO-3)
        if self.is_main:
            prefix = "model."  # the Objective's name for the policy's model
            self.policy.save(temporary, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                             self._record(step))
            publish(temporary, destination)
        self.accelerator.wait_for_everyone()
        return destination

    def save_checkpoint(self, step: int, order: RecordOrder) -> Path:
        """A resumable checkpoint that is also a loadable model folder; old ones beyond keep_checkpoints go."""

        def fill_engine(folder: Path) -> None:
            self.accelerator.save_state(str(folder / ENGINE_STATE))
            if self.is_main:
                state = {"step": step, "order": order.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "resolved_paths": self._resolved_paths(), **self._record(step)}
                (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2, allow_nan=False) + "\n",
                                                    encoding="utf-8")

        folder = self._write(self.checkpoints / f"step-{step:06d}", step, fill_engine)
        if self.is_main:
            for old in self._checkpoint_folders()[: -self.config.keep_checkpoints]:
                retire(old)
        return folder

    def end_of_step(self, step: int, order: RecordOrder) -> None:
        """Write the resumable checkpoint when one is due: every save_every steps and at the last step."""
        if (self.config.save_every and step % self.config.save_every == 0) or step == self.config.steps:
            self.save_checkpoint(step, order)

    def finish(self, curves: Sequence[str]) -> Path:
        """Export final/, draw the logged `curves` into curves.png and end the processes; returns final/."""
        final = self._write(self.output / "final", self.config.steps, None)
        if self.is_main:
            plot_curves(self.metrics_path, self.output / "curves.png", curves)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.release_folder()
        return final
