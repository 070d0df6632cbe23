"""The memory one GRPO step needs per process, estimated before the first step, so a run that cannot fit says so
at start instead of running out of memory minutes in.

This is an estimate, not a measurement. The parameter counts are exact (they are read from the model's own
modules); everything else follows from the formulas below. Not counted: the CUDA context (about 0.5 GiB),
allocator fragmentation, communication buckets, the layers ZeRO-3 and FSDP gather one at a time during the loss
and while the reference scores, the reference's root unit FSDP gathers meanwhile (its embeddings, heads and
aligners: 1.8 GiB at 7B in bf16, less than the KV cache the rollout has freed by then), the embeddings' and
aligners' activations (a few R·N·h), and transient buffers in backward.

Per process, in bytes (P: every parameter, T: the trainable ones, n: processes):

    weights      P · w        w = 4 (fp32 master weights); 2 under DeepSpeed with bf16, whose engine casts the module
    gradients    T · w        DDP's are views of its reducer's buckets (gradient_as_bucket_view), except with
                 prompts_per_step > 1: zero_grad(set_to_none) leaves none to accumulate into, so the first
                 micro-steps accumulate apart from the buckets until the last backward copies them in (twice)
    optimizer    T · 8        AdamW's two fp32 states; DeepSpeed keeps an fp32 master copy too (12)
    reference    the frozen KL reference: P minus the vision tower and VQ it does without, in 2 bytes (bf16) or 4;
                 none with beta = 0 or LoRA (its reference is the same model with the adapters off)
    autocast     2 · the trainable weights of every Linear outside the two heads, under bf16 autocast over fp32
                 weights (single, DDP): autocast keeps a bf16 copy of each for as long as its region lasts (the
                 whole rollout; the loss's forward, and through backward without checkpointing)
    activations  what the loss's forward keeps for backward: see `decoder_layer_bytes` and `segment_activations`
    rollout      the sampler's KV cache for its longest stage, plus the full weights that ZeRO-3 and FSDP gather
                 for sampling

ZeRO-1 divides the optimizer by n, ZeRO-2 the gradients too, and ZeRO-3 and FSDP (full shard) the weights and the
reference as well (`Run.prepare_reference` shards it as TRL does); elsewhere the reference is replicated on every
process. The peak is weights + optimizer + reference + autocast + max(gradients + activations, rollout): the
rollout samples while the gradients are freed, and the loss comes after it.

    python -m training.memory --shape janus-pro-7b --engine zero3 --processes 8 --dtype bf16 \
        --gradient_checkpointing true --num_generations 8
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmr1.model import MMR1Model

if TYPE_CHECKING:
    from .grpo import GRPOConfig

GIB = 2**30
# Tokens of a grounding prompt besides the reference images: the chat roles, the grounding instruction (about 75
# tokens with DeepSeek's tokenizer) and a short user prompt.
PROMPT_TOKENS = 96


@dataclass(frozen=True)
class Engine:
    """How an engine lays out the training state on each of its processes."""

    sharded: tuple[str, ...] = ()  # the parts divided by the number of processes
    gradient_buckets: bool = False  # DDP: the reducer's buckets, apart from the gradients while micro-steps accumulate
    deepspeed: bool = False  # bf16 casts the module to bf16; the optimizer keeps an fp32 master copy
    bf16_weights: bool = False  # under bf16 the engine computes with bf16 weights, not autocast over fp32 ones


ENGINES = {
    "single": Engine(),
    "ddp": Engine(gradient_buckets=True),
    "zero0": Engine(deepspeed=True, bf16_weights=True),
    "zero1": Engine(("optimizer",), deepspeed=True, bf16_weights=True),
    "zero2": Engine(("gradients", "optimizer"), deepspeed=True, bf16_weights=True),
    "zero3": Engine(("weights", "gradients", "optimizer", "reference"), deepspeed=True, bf16_weights=True),
    "fsdp": Engine(("weights", "gradients", "optimizer", "reference"), bf16_weights=True),  # bf16: FSDP's param_dtype
}


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor, from the dtype knob and the engine."""

    weight: int  # a stored parameter, and its gradient
    optimizer: int  # per trainable parameter
    activation: int  # a matmul's input or output
    residual: int  # the residual stream between layers: fp32 whenever the weights compute in fp32
    autocast: bool  # bf16 autocast over fp32 weights

    @classmethod
    def of(cls, dtype: str, engine: Engine) -> Precision:
        bf16 = dtype == "bf16"
        weight = 2 if bf16 and engine.deepspeed else 4
        return cls(weight=weight, optimizer=12 if engine.deepspeed else 8, activation=2 if bf16 else 4,
                   residual=2 if bf16 and engine.bf16_weights else 4, autocast=bf16 and not engine.bf16_weights)


@dataclass(frozen=True)
class Parameters:
    """Parameter counts of the Janus model, exact from its modules."""

    total: int  # every parameter, LoRA adapters included
    trainable: int  # full fine-tuning: all but the vision tower and VQ; LoRA: the adapters
    reference: int  # what the frozen KL reference copies: all but the vision tower and VQ
    autocast_linears: int  # trainable weights of the Linear layers autocast runs (every one but the two heads)
    frozen_linears_per_layer: int  # LoRA: frozen Linear weights of one decoder layer, cast again at every call


def lora_parameters(language_model: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """peft's A and B matrices: rank · (in + out) for every targeted Linear of the language model."""
    return sum(rank * (module.in_features + module.out_features) for name, module in language_model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def count_parameters(janus: torch.nn.Module, config: GRPOConfig) -> Parameters:
    """The counts of `janus` (a JanusForConditionalGeneration as loaded, before make_policy) under `config`."""
    if any("lora_" in name for name, _ in janus.named_parameters()):
        raise ValueError("Estimate the model as loaded: it already holds LoRA adapters (make_policy adds them).")

    def numel(module: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    total = numel(janus)
    frozen = numel(janus.model.vision_model) + numel(janus.model.vqmodel)
    language_model = janus.model.language_model
    lm_linears = sum(numel(module) for module in language_model.modules() if isinstance(module, torch.nn.Linear))
    if config.lora_rank:
        adapters = lora_parameters(language_model, config.lora_rank, config.lora_targets)
        layers = janus.config.text_config.num_hidden_layers
        return Parameters(total + adapters, adapters, 0, adapters, lm_linears // layers)
    heads = {id(module) for head in (janus.lm_head, janus.model.generation_head) for module in head.modules()}
    frozen_ids = {id(p) for module in (janus.model.vision_model, janus.model.vqmodel) for p in module.parameters()}
    autocast_linears = sum(
        parameter.numel() for module in janus.modules()
        if isinstance(module, torch.nn.Linear) and id(module) not in heads
        for parameter in module.parameters() if id(parameter) not in frozen_ids
    )
    return Parameters(total, total - frozen, total - frozen, autocast_linears, 0)


@dataclass(frozen=True)
class SegmentShape:
    """One optimised segment's teacher-forced forward: `rows` rows of prefix + sampled positions; the head
    scores the sampled ones."""

    name: str  # "reasoning", "subject" or "image"
    rows: int  # 2G for the guided image segment (conditional rows and their unconditional twins), else G
    prefix: int
    sampled: int
    vocab: int  # of the segment's head
    log_softmax_rows: int  # G per log-softmax kept for backward: the policy's, and the KL's untruncated one if apart

    @property
    def positions(self) -> int:
        return self.rows * (self.prefix + self.sampled)


def segment_shapes(janus: torch.nn.Module, config: GRPOConfig, references: int, prompt_tokens: int
                   ) -> dict[str, SegmentShape]:
    """The segments' shapes, from the layout of `mmr1.prompting.build_sequence`: the grounding prompt holds
    each reference's understanding slots between <begin_of_image> and <end_of_image> and a newline; the image
    prompt adds the reasoning, the subject's VQ tokens (subject_source reference or generate) and the final
    tokens; under generate the subject is a segment of its own, drawn after the reasoning."""
    g = config.num_generations
    understanding = janus.config.vision_config.num_image_tokens
    image_tokens = janus.config.vq_config.num_patches**2
    grounding = references * (understanding + 3) + prompt_tokens
    subject = image_tokens + 3 if references and config.subject_source != "none" else 0
    image = config.image_settings
    separate_kl = config.beta > 0 and image.untruncated != image  # top-k / top-p: the KL's distribution differs
    reasoning = config.max_reasoning_tokens
    rows, kl_rows = 2 * g if image.guided else g, 2 * g if separate_kl else g
    shapes = {
        "reasoning": SegmentShape("reasoning", g, grounding, reasoning, janus.config.text_config.vocab_size, g),
        "image": SegmentShape("image", rows, grounding + reasoning + subject + 2, image_tokens,
                              janus.config.vq_config.num_embeddings, kl_rows),
    }
    if config.subject_source == "generate" and references:
        shapes["subject"] = SegmentShape("subject", rows, grounding + reasoning + 2, image_tokens,
                                         janus.config.vq_config.num_embeddings, kl_rows)
    return shapes


def decoder_layer_bytes(hidden: int, intermediate: int, precision: Precision) -> int:
    """Bytes one Llama decoder layer keeps for backward, per position (one row's token).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1) count
    sbh(34 + 5as/h) bytes per GPT layer with 16-bit activations: 11sbh + 5as²b in attention, 19sbh in the
    4h-GeLU MLP, 4sbh in the two LayerNorms. Janus's LlamaModel differs:
    - no dropout, so no masks;
    - sdpa (flash or memory-efficient kernels) keeps q, k, v, its output (o_proj's input) and a logsumexp, never
      the a·s² scores: the 5as/h term goes, and attention keeps 4h;
    - the SwiGLU MLP keeps four I-sized tensors (gate and up outputs, the SiLU output, their product);
    - the projections keep their input: one shared by q/k/v and one by gate/up (2h), but under autocast each of
      the five casts and keeps its own bf16 copy (5h);
    - RMSNorm computes in fp32: each of the two keeps its fp32 input and its normalised output (residual bytes).
    So 2·(4 + r)·h + c·((4 + k)·h + 4I), with c the activation bytes (2 in bf16, 4 in fp32), r the residual
    stream's and k = 5 under autocast, else 2. On the CPU it is within 1 % of what autograd keeps (counted with
    saved-tensor hooks in tests/training/test_memory.py; the rest is the rotary tables and the logsumexp).
    """
    inputs = 5 if precision.autocast else 2
    return 2 * (4 + precision.residual) * hidden + precision.activation * ((4 + inputs) * hidden + 4 * intermediate)


def segment_activations(shape: SegmentShape, text_config, precision: Precision, parameters: Parameters,
                        checkpointing: bool) -> tuple[int, int]:
    """(kept, one layer): what the segment's forward keeps for backward, and one decoder layer's full share.

    Without checkpointing every layer keeps its activations; with it each keeps only its input (r·h per
    position), and a layer's activations exist again while backward recomputes it (the caller adds the largest
    one once). LoRA under autocast adds each layer's frozen Linear weights, cast to bf16 at every call and kept
    for backward. The heads run in fp32 and add the logits of the rows and the log-softmax of the G guided rows
    (once more for the KL's untruncated distribution), over the sampled positions.
    """
    h, layers = text_config.hidden_size, text_config.num_hidden_layers
    copies = 2 * parameters.frozen_linears_per_layer if precision.autocast else 0
    layer = shape.positions * decoder_layer_bytes(h, text_config.intermediate_size, precision) + copies
    kept_per_layer = shape.positions * precision.residual * h if checkpointing else layer
    head = 4 * shape.sampled * shape.vocab * (shape.rows + shape.log_softmax_rows)
    return layers * kept_per_layer + head, layer


def share(nbytes: int, part: str, engine: Engine, processes: int) -> int:
    """One process's bytes of a part: the ceiling of its share where the engine shards it."""
    return -(-nbytes // processes) if part in engine.sharded else nbytes


@dataclass(frozen=True)
class StepMemory:
    """Estimated bytes per process of one GRPO step, by part (see the module docstring), with what it assumed."""

    weights: int
    gradients: int
    optimizer: int
    reference: int
    autocast: int
    activations: int
    rollout: int
    engine: str
    processes: int
    dtype: str
    gradient_checkpointing: bool
    num_generations: int
    references: int
    parameters: Parameters
    segments: tuple[SegmentShape, ...]  # the ones the loss runs, in the step that needs the most

    @property
    def total(self) -> int:
        """The peak: the loss (gradients, activations) and the rollout (KV cache, gathered weights) never overlap."""
        return (self.weights + self.optimizer + self.reference + self.autocast
                + max(self.gradients + self.activations, self.rollout))

    @property
    def layout(self) -> Engine:
        return ENGINES[self.engine]

    def fits(self, capacity: int) -> bool:
        return self.total <= capacity

    def report(self, capacity: int | None = None) -> str:
        """A few lines naming each part and the assumptions; with `capacity` (bytes), whether the step fits."""
        p = self.parameters
        shapes = "; ".join(f"{s.name} {s.rows} rows x ({s.prefix} prefix + {s.sampled} sampled)" for s in self.segments)
        parts = {
            "weights": f"{p.total:,} parameters",
            "gradients": f"{p.trainable:,} trainable",
            "optimizer": "AdamW states" + (" and DeepSpeed's fp32 master copy" if self.layout.deepspeed else ""),
            "reference": ("frozen KL reference" + (", sharded" if "reference" in self.layout.sharded else "")
                          if self.reference else "none (beta = 0 or LoRA)"),
            "autocast": "bf16 copies of the trainable Linear weights" if self.autocast else "none",
            "activations": "with gradient checkpointing" if self.gradient_checkpointing else "without checkpointing",
            "rollout": "sampler's KV cache" + (", gathered full weights" if "weights" in self.layout.sharded else ""),
        }
        lines = [f"Estimated memory of one GRPO step per process ({self.engine}, {self.processes} process"
                 f"{'es' if self.processes > 1 else ''}, {self.dtype}, G = {self.num_generations}, "
                 f"{self.references} reference image{'s' if self.references != 1 else ''}): {shapes}"]
        lines += [f"  {name:<12}{getattr(self, name) / GIB:8.2f} GiB  {note}" for name, note in parts.items()]
        lines.append(f"  {'peak':<12}{self.total / GIB:8.2f} GiB  weights + optimizer + reference + autocast + "
                     "max(gradients + activations, rollout); an estimate (no CUDA context, fragmentation or buffers)")
        if capacity is not None:
            if self.fits(capacity):
                lines.append(f"  fits in the device's {capacity / GIB:.2f} GiB")
            else:
                lines.append(f"WARNING: one step needs about {self.total / GIB:.2f} GiB per process, more than the "
                             f"device's {capacity / GIB:.2f} GiB; try {', '.join(self.remedies())}.")
        return "\n".join(lines)

    def remedies(self) -> list[str]:
        """The knobs that would lower the estimate from here."""
        sharded = "weights" in self.layout.sharded
        options = [
            ("gradient_checkpointing = true", not self.gradient_checkpointing),
            ("dtype = bf16", self.dtype != "bf16"),
            ("LoRA (lora_rank > 0)", self.parameters.reference > 0),
            ("ZeRO-3 or FSDP", not sharded),
            ("more processes", sharded),
            ("a smaller num_generations", True),
        ]
        return [option for option, useful in options if useful]


def estimate_step_memory(model: MMR1Model | torch.nn.Module, config: GRPOConfig, engine: str = "single",
                         processes: int = 1, references: int = 1, prompt_tokens: int = PROMPT_TOKENS) -> StepMemory:
    """The memory per process of one step of `config` on `model` (an MMR1Model or its JanusForConditionalGeneration,
    as loaded: real, or on the meta device), under `engine` (one of ENGINES) on `processes` processes, for records
    of `references` reference images and grounding prompts of `prompt_tokens` other tokens."""
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}.")
    janus = model.model if isinstance(model, MMR1Model) else model
    layout = ENGINES[engine]
    precision = Precision.of(config.dtype, layout)
    parameters = count_parameters(janus, config)
    text_config = janus.config.text_config
    shapes = segment_shapes(janus, config, references, prompt_tokens)

    def activations(names: tuple[str, ...]) -> int:
        parts = [segment_activations(shapes[name], text_config, precision, parameters, config.gradient_checkpointing)
                 for name in names]
        recomputed = max(layer for _, layer in parts) if config.gradient_checkpointing else 0
        return sum(kept for kept, _ in parts) + recomputed

    steps = {config.segments_at(1), config.segments_at(1 + config.alternate_every)}  # 'alternate' has two kinds
    names = max(steps, key=activations)
    weights = parameters.total * precision.weight
    # Keys leave the rotary embedding in the residual stream's dtype (fp32 under autocast), values in the activations'.
    kv_bytes = text_config.num_hidden_layers * text_config.hidden_size * (precision.residual + precision.activation)
    kv_cache = max(shape.positions for shape in shapes.values()) * kv_bytes
    gathered = weights - share(weights, "weights", layout, processes)
    accumulating = layout.gradient_buckets and config.prompts_per_step > 1
    reference = 0 if config.beta == 0 else parameters.reference * (2 if config.dtype == "bf16" else 4)
    return StepMemory(
        weights=share(weights, "weights", layout, processes),
        gradients=share(parameters.trainable * precision.weight, "gradients", layout, processes)
        * (2 if accumulating else 1),
        optimizer=share(parameters.trainable * precision.optimizer, "optimizer", layout, processes),
        reference=share(reference, "reference", layout, processes),
        autocast=2 * parameters.autocast_linears if precision.autocast else 0,
        activations=activations(names),
        rollout=kv_cache + gathered,
        engine=engine, processes=processes, dtype=config.dtype, gradient_checkpointing=config.gradient_checkpointing,
        num_generations=config.num_generations, references=references, parameters=parameters,
        segments=tuple(shapes[name] for name in names),
    )


def engine_kind(accelerator) -> str:
    """The ENGINES key of an accelerate run (FSDP is taken as full shard, accelerate's default)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def device_memory(device: torch.device | str) -> int | None:
    """Total memory of a CUDA device; None elsewhere (a CPU shares host memory with everything else)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def main(argv: list[str] | None = None) -> int:
    """Print the estimate for one of `mmr1.tiny.SHAPES`, built on the meta device (no memory, no download); a bad
    knob is one `error:` line and exit status 2."""
    from mmr1.errors import report_user_errors
    from mmr1.tiny import SHAPES, build_random_model

    from .config import config_from_args
    from .grpo import GRPOConfig

    parser = argparse.ArgumentParser(
        description="Estimate the memory per process of one GRPO step. Any GRPO knob may follow as --key value "
                    "(python -m training.grpo --help lists them).")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="janus-pro-7b", help="model architecture")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="single")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--references", type=int, default=1, help="reference images per record")
    parser.add_argument("--prompt_tokens", type=int, default=PROMPT_TOKENS, help="grounding prompt tokens besides "
                                                                                  "the references")
    parser.add_argument("--gpu_gib", type=float, default=None, help="device memory to check against (default: "
                                                                     "this machine's first CUDA device, if any)")
    args, knobs = parser.parse_known_args(argv)

    def run() -> int:
        # model and data are required keys of a recipe config, but the estimate reads neither.
        config = config_from_args(GRPOConfig, parser.description, ["--model", args.shape, "--data", "-", *knobs])
        janus, _ = build_random_model(SHAPES[args.shape], device="meta")
        estimate = estimate_step_memory(janus, config, args.engine, args.processes, args.references,
                                        args.prompt_tokens)
        if args.gpu_gib is not None:
            capacity = int(args.gpu_gib * GIB)
        else:
            capacity = device_memory("cuda") if torch.cuda.is_available() else None
        print(estimate.report(capacity))
        return 0

    return report_user_errors(run)


if __name__ == "__main__":
    raise SystemExit(main())
