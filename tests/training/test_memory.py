"""The step-memory estimate: its parts against hand counts on the tiny model and against the trainer's own policy,
the engines' sharding, gradient checkpointing, the activation formula against what autograd really keeps, and
Janus-Pro-7B's figures built on the meta device."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from mmr1.tiny import SHAPES, TinySpec, build_random_model
from training.grpo import GRPOConfig
from training.memory import (
    ENGINES, GIB, PROMPT_TOKENS, Precision, decoder_layer_bytes, device_memory, engine_kind, estimate_step_memory, main,
)
from training.policy import LORA_TARGETS, LoraSettings, make_policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FROZEN = ("model.vision_model.", "model.vqmodel.")
HEADS = ("lm_head", "model.generation_head.")


def grpo_config(**knobs) -> GRPOConfig:
    return GRPOConfig(model=Path("model"), data=Path("data"), **knobs)


@pytest.fixture(scope="module")
def tiny():
    return build_random_model()[0]


@pytest.fixture(scope="module")
def counts(tiny):
    """Parameter counts by name, independently of the module under test."""
    named = dict(tiny.named_parameters())
    total = sum(p.numel() for p in named.values())
    frozen = sum(p.numel() for name, p in named.items() if name.startswith(FROZEN))
    linears = sum(p.numel() for name, module in tiny.named_modules() if isinstance(module, torch.nn.Linear)
                  and not f"{name}.".startswith(FROZEN + HEADS) for p in module.parameters())
    return {"total": total, "trainable": total - frozen, "linears": linears}


def test_parts_equal_a_hand_count_on_the_tiny_model(tiny, counts):
    total, trainable = counts["total"], counts["trainable"]
    fp32 = estimate_step_memory(tiny, grpo_config(dtype="fp32"))
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * total, 4 * trainable, 8 * trainable)
    assert fp32.reference == 4 * trainable  # the reference does without the vision tower and the VQ
    assert fp32.autocast == 0
    bf16 = estimate_step_memory(tiny, grpo_config(dtype="bf16"))
    assert bf16.weights == 4 * total  # fp32 master weights
    assert bf16.reference == 2 * trainable
    assert bf16.autocast == 2 * counts["linears"]
    assert 0 < counts["linears"] < trainable


def test_parts_match_the_trainers_policy(tiny_hf_dir):
    from mmr1.loading import load_model

    mm = load_model(tiny_hf_dir, dtype="fp32", device="cpu")
    estimate = estimate_step_memory(mm, grpo_config(dtype="bf16"))
    policy = make_policy(mm, tiny_hf_dir, None, with_reference=True, reference_dtype=torch.bfloat16)
    trainable = sum(p.numel() for p in mm.model.parameters() if p.requires_grad)
    shared = {id(p) for p in mm.model.parameters()}
    reference = sum(p.numel() * p.element_size() for p in policy.reference_model.parameters() if id(p) not in shared)
    assert (estimate.gradients, estimate.reference) == (4 * trainable, reference)

    mm = load_model(tiny_hf_dir, dtype="fp32", device="cpu")
    estimate = estimate_step_memory(mm, grpo_config(lora_rank=4))
    make_policy(mm, tiny_hf_dir, LoraSettings(4, 16.0, 0.0, LORA_TARGETS), with_reference=False)
    adapters = sum(p.numel() for p in mm.model.parameters() if p.requires_grad)
    assert estimate.parameters.trainable == adapters
    assert estimate.weights == 4 * sum(p.numel() for p in mm.model.parameters())
    with pytest.raises(ValueError, match="as loaded"):
        estimate_step_memory(mm, grpo_config(lora_rank=4))


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engines_divide_the_right_parts(tiny, counts, engine):
    total, trainable, n = counts["total"], counts["trainable"], 4
    single = estimate_step_memory(tiny, grpo_config())
    estimate = estimate_step_memory(tiny, grpo_config(), engine=engine, processes=n)
    sharded = {
        "single": (), "ddp": (), "zero0": (), "zero1": ("optimizer",), "zero2": ("gradients", "optimizer"),
        "zero3": ("weights", "gradients", "optimizer", "reference"),
        "fsdp": ("weights", "gradients", "optimizer", "reference"),
    }[engine]
    expected = {
        "weights": 4 * total,
        "gradients": 4 * trainable,  # DDP's too: views of its reducer's buckets
        "optimizer": (12 if engine.startswith("zero") else 8) * trainable,  # DeepSpeed keeps an fp32 master copy
        "reference": 4 * trainable,  # sharded with the weights (Run.prepare_reference), else on every process
    }
    for part, nbytes in expected.items():
        assert getattr(estimate, part) == (-(-nbytes // n) if part in sharded else nbytes), part
    assert estimate.activations == single.activations
    assert estimate.rollout - single.rollout == 4 * total - estimate.weights  # sampling gathers the full weights


def test_ddp_holds_the_gradients_twice_only_while_micro_steps_accumulate(tiny, counts):
    """With prompts_per_step > 1 the first micro-steps accumulate into gradients of their own (zero_grad set them
    to None), apart from the reducer's buckets, until the last backward copies them in."""
    for prompts_per_step, copies in ((1, 1), (2, 2)):
        config = grpo_config(prompts_per_step=prompts_per_step)
        ddp = estimate_step_memory(tiny, config, engine="ddp", processes=2)
        assert ddp.gradients == copies * 4 * counts["trainable"]
        assert estimate_step_memory(tiny, config).gradients == 4 * counts["trainable"]  # no reducer


def test_deepspeed_bf16_holds_bf16_weights_and_an_fp32_master_copy(tiny, counts):
    estimate = estimate_step_memory(tiny, grpo_config(dtype="bf16"), engine="zero3", processes=2)
    assert estimate.weights == -(-2 * counts["total"] // 2)
    assert estimate.gradients == -(-2 * counts["trainable"] // 2)
    assert estimate.optimizer == -(-12 * counts["trainable"] // 2)
    assert estimate.autocast == 0  # DeepSpeed runs the bf16 module without autocast


def test_gradient_checkpointing_keeps_each_layers_input(tiny):
    spec, g, refs = TinySpec(), 4, 2
    h, i, layers = spec.hidden_size, spec.intermediate_size, spec.num_layers
    tokens = (spec.image_size // spec.patch_size) ** 2  # understanding slots and image tokens alike: 64
    rows = 2 * g  # guided: conditional rows and their unconditional twins
    prefix = refs * (tokens + 3) + PROMPT_TOKENS + 64 + (tokens + 3) + 2  # max_reasoning_tokens = 64
    positions = rows * (prefix + tokens)
    layer = positions * (2 * (4 + 4) * h + 4 * (6 * h + 4 * i))  # fp32: see decoder_layer_bytes
    head = 4 * tokens * spec.vq_codebook_size * (rows + g)
    knobs = {"num_generations": g, "segments": "image", "max_reasoning_tokens": 64, "cfg_scale": 5.0}
    without, with_ = (estimate_step_memory(tiny, grpo_config(**knobs, gradient_checkpointing=on), references=refs)
                      for on in (False, True))
    assert without.activations == layers * layer + head
    assert with_.activations == layers * positions * 4 * h + layer + head
    assert (without.activations - head) / (with_.activations - head) == pytest.approx(
        layers * layer / (layers * positions * 4 * h + layer))
    assert with_.activations < without.activations


def test_both_segments_add_up_and_alternate_takes_the_larger(tiny):
    def activations(segments: str, checkpointing: bool = False) -> int:
        config = grpo_config(segments=segments, gradient_checkpointing=checkpointing)
        return estimate_step_memory(tiny, config).activations

    assert activations("both") == activations("image") + activations("reasoning")
    assert activations("alternate") == max(activations("image"), activations("reasoning"))
    # Checkpointed, both segments' layer inputs stay, but backward recomputes one layer at a time.
    assert activations("image", True) < activations("both", True) < activations("image", True) + activations(
        "reasoning", True)


def test_a_drawn_subject_is_a_segment_of_its_own(tiny):
    def estimate(**knobs):
        return estimate_step_memory(tiny, grpo_config(gradient_checkpointing=False, **knobs))

    given, drawn = estimate(subject_source="reference"), estimate(subject_source="generate")
    assert [shape.name for shape in drawn.segments] == ["reasoning", "subject", "image"]
    subject = drawn.segments[1]
    image = next(shape for shape in given.segments if shape.name == "image")
    assert subject.sampled == image.sampled and subject.prefix < image.prefix  # drawn before the subject's slots
    only = estimate(subject_source="generate", segments="subject")
    assert drawn.activations == given.activations + only.activations


def test_beta_zero_and_lora_have_no_reference(tiny):
    assert estimate_step_memory(tiny, grpo_config(beta=0.0)).reference == 0
    knobs = {"dtype": "bf16", "gradient_checkpointing": False}
    lora = estimate_step_memory(tiny, grpo_config(lora_rank=8, **knobs))
    assert lora.reference == 0
    language_model = tiny.model.language_model
    linears = [(name, m) for name, m in language_model.named_modules() if isinstance(m, torch.nn.Linear)]
    adapters = sum(8 * (m.in_features + m.out_features) for name, m in linears
                   if name.rsplit(".", 1)[-1] in LORA_TARGETS)
    assert (lora.gradients, lora.optimizer, lora.autocast) == (4 * adapters, 8 * adapters, 2 * adapters)
    # Under autocast each segment's forward casts every frozen fp32 Linear weight anew and keeps the bf16 copy.
    frozen = sum(p.numel() for _, m in linears for p in m.parameters())
    full = estimate_step_memory(tiny, grpo_config(**knobs))
    assert lora.activations - full.activations == 2 * 2 * frozen  # two segments, 2 bytes


def saved_bytes(model, rows: int, length: int, precision: Precision) -> int:
    """Bytes of the activations autograd keeps from the language model's forward (parameters and the bf16 copies
    autocast makes of them left out), counted once per storage."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and tuple(tensor.shape) not in weight_shapes:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    # The trainer's prefix embeddings come from trainable tables and aligners, so the first layer keeps its input.
    embeds = torch.randn(rows, length, model.config.text_config.hidden_size, dtype=model.dtype, requires_grad=True)
    mask = torch.ones(rows, length, dtype=torch.long)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision.autocast else contextlib.nullcontext()
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    return sum(kept.values())


@pytest.mark.parametrize("dtype, engine", [("fp32", "single"), ("bf16", "single"), ("bf16", "zero3")])
def test_the_layer_formula_matches_what_autograd_keeps(dtype, engine):
    """fp32; bf16 autocast over fp32 weights; bf16 weights without autocast (DeepSpeed's bf16 module)."""
    precision = Precision.of(dtype, ENGINES[engine])
    spec = TinySpec(hidden_size=256, intermediate_size=688, num_layers=2, num_heads=4)
    model = build_random_model(spec, dtype=torch.bfloat16 if precision.weight == 2 else torch.float32)[0].train()
    rows, length, h = 3, 100, spec.hidden_size  # 300 positions: no activation has a weight's shape
    final_norm = (4 + precision.residual) * h  # its fp32 input and normalised output
    layers = spec.num_layers * decoder_layer_bytes(h, spec.intermediate_size, precision)
    assert saved_bytes(model, rows, length, precision) == pytest.approx(rows * length * (layers + final_norm), rel=0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = rows * length * (spec.num_layers * precision.residual * h + final_norm)
    assert saved_bytes(model, rows, length, precision) == pytest.approx(checkpointed, rel=0.02)


@pytest.fixture(scope="module")
def janus_pro_7b():
    return build_random_model(SHAPES["janus-pro-7b"], device="meta")[0]


def test_janus_pro_7b_in_bf16_with_eight_rollouts(janus_pro_7b):
    """Hand figures: 7.41e9 parameters (fp32: 27.6 GiB), 7.03e9 trainable without the 0.30e9 vision tower and
    the 0.07e9 VQ (gradients 26.2 GiB, AdamW 52.4 GiB, bf16 reference 13.1 GiB). The image segment alone keeps
    30 layers x 16 rows x 1896 positions x (34 h + 8 I = 227,328 B) = 193 GiB without checkpointing, and
    30 x 16 x 1896 x 4 h x 4 B (13.9 GiB) plus one layer (6.4 GiB) with it."""
    knobs = {"dtype": "bf16", "num_generations": 8, "max_reasoning_tokens": 64, "cfg_scale": 5.0, "beta": 0.01}
    single = estimate_step_memory(janus_pro_7b, grpo_config(**knobs, gradient_checkpointing=False))
    assert single.parameters.total == pytest.approx(7.41e9, rel=0.01)
    assert single.weights / GIB == pytest.approx(27.6, abs=0.1)
    assert single.gradients / GIB == pytest.approx(26.2, abs=0.1)
    assert single.optimizer / GIB == pytest.approx(52.4, abs=0.1)
    assert single.reference / GIB == pytest.approx(13.1, abs=0.1)
    assert 150 * GIB < single.activations < 250 * GIB
    checkpointed = estimate_step_memory(janus_pro_7b, grpo_config(**knobs, gradient_checkpointing=True))
    assert 15 * GIB < checkpointed.activations < 35 * GIB
    assert checkpointed.total > 141 * GIB  # beyond one H200
    sharded = estimate_step_memory(janus_pro_7b, grpo_config(**knobs, gradient_checkpointing=True), engine="zero3",
                                   processes=8)
    assert sharded.weights / GIB == pytest.approx(27.6 / 2 / 8, abs=0.05)  # DeepSpeed's bf16 module, sharded
    assert sharded.reference / GIB == pytest.approx(13.1 / 8, abs=0.01)  # sharded too
    assert 30 * GIB < sharded.total < 45 * GIB
    ddp = estimate_step_memory(janus_pro_7b, grpo_config(**knobs, gradient_checkpointing=True), engine="ddp",
                               processes=8)
    assert ddp.gradients == checkpointed.gradients  # no second copy in the reducer
    assert ddp.reference == checkpointed.reference  # replicated


def test_report_names_every_part_and_says_whether_it_fits(tiny):
    config = grpo_config(num_generations=8, gradient_checkpointing=False)
    estimate = estimate_step_memory(tiny, config, engine="zero3", processes=8)
    report = estimate.report()
    for word in ("weights", "gradients", "optimizer", "reference", "autocast", "activations", "rollout", "peak",
                 "zero3", "8 processes", "G = 8", "16 rows", "prefix", "GiB"):
        assert word in report, word
    assert f"{estimate.total / GIB:.2f} GiB" in report
    assert "WARNING" not in report
    assert estimate.fits(estimate.total) and not estimate.fits(estimate.total - 1)
    assert "fits in the device" in estimate.report(estimate.total)
    warning = estimate.report(estimate.total - 1).splitlines()[-1]
    assert warning.startswith("WARNING") and "gradient_checkpointing = true" in warning
    assert device_memory("cpu") is None


def test_engine_kind_of_a_one_process_run_and_unknown_engines(tiny):
    from accelerate import Accelerator

    assert engine_kind(Accelerator(cpu=True)) == "single"
    with pytest.raises(ValueError, match="Unknown engine"):
        estimate_step_memory(tiny, grpo_config(), engine="zero4")


def test_command_prints_the_estimate(capsys):
    assert main(["--shape", "tiny", "--num_generations", "4", "--dtype", "bf16", "--gpu_gib", "0.0001",
                 "--gradient_checkpointing", "false"]) == 0
    out = capsys.readouterr().out
    assert "G = 4" in out and "bf16" in out and "without checkpointing" in out
    assert out.strip().splitlines()[-1].startswith("WARNING")
    assert main(["--shape", "tiny", "--num_generations", "1"]) == 2  # the recipe's own config checks
    assert "num_generations" in capsys.readouterr().err
