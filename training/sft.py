"""Cold-start SFT for X-CoT: teacher-forced loss on the reasoning tokens and on the target image's VQ tokens.

One training sequence is the X-CoT chain of `mmr1.prompting.build_sequence` followed by the target image:

    [user turn: references, request] <|Assistant|>: reasoning "\\n" <begin_of_image> [subject] ... <begin_of_image> target tokens
                                                    |-------- text segment --------|                               |-- image --|

The text segment (the reasoning up to and including the <begin_of_image> that ends it, where grounding stops)
is scored by the language head, the image segment by the generation head. Each segment's loss is a mean over
its own tokens and the two are weighted, so 576 image tokens do not drown 50 reasoning tokens. With probability
`unconditional_prob` an example's image segment sees the unconditional (padded) context instead, which keeps
classifier-free guidance meaningful.

    python -m training.sft --config training/configs/sft_tiny.toml
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mmr1.prompting import PromptSequence, batch_prefix, build_sequence, check_fits, embed_sequence
from mmr1.xcot import extract_subject

from .checkpoints import save_recipe_checkpoint
from .config import check_recipe_keys, config_to_dict, knob, recipe_main
from .data import Record, read_records


@dataclass(frozen=True)
class SFTConfig:
    model: Path = knob(None, "Janus checkpoint folder to start from (any layout mmr1 loads)")
    data: Path = knob(None, "JSONL records with target and reasoning (see training/data.py)")
    output_dir: Path = knob(Path("runs/sft"), "where checkpoints and metrics.jsonl are written")
    steps: int = knob(200, "optimizer steps")
    batch_size: int = knob(4, "records per micro-batch")
    gradient_accumulation: int = knob(1, "micro-batches per optimizer step")
    learning_rate: float = knob(1e-4, "AdamW learning rate (constant after warmup)")
    warmup_steps: int = knob(10, "linear learning-rate warmup steps")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    max_grad_norm: float = knob(1.0, "gradient clipping norm (0 disables)")
    text_weight: float = knob(1.0, "weight of the reasoning (text) segment's mean loss")
    image_weight: float = knob(1.0, "weight of the image segment's mean loss")
    unconditional_prob: float = knob(0.1, "probability that an example's image segment sees the padded context")
    subject_source: str = knob("reference", "visual intermediate in the chain: 'reference' or 'none'")
    dtype: str = knob("fp32", "training dtype: fp32 or bf16")
    device: str | None = knob(None, "cpu, cuda, ... (default: cuda when available)")
    gradient_checkpointing: bool = knob(False, "recompute activations in backward to save memory")
    seed: int = knob(0, "seed of the data order, the unconditional draws and the initialisation")
    log_every: int = knob(10, "steps between metrics lines")
    save_every: int = knob(0, "steps between checkpoints (0: only the final one)")

    def __post_init__(self) -> None:
        check_recipe_keys(self, at_least_one=("batch_size", "gradient_accumulation"))
        if not 0.0 <= self.unconditional_prob < 1.0:
            raise ValueError("config key 'unconditional_prob' must be in [0, 1)")


@dataclass
class Example:
    """One record prepared for teacher forcing."""

    sequence: PromptSequence  # the X-CoT chain up to the <begin_of_image> of the new image
    text_start: int  # first position of the reasoning segment
    text_end: int  # last position of it: the <begin_of_image> that ends the reasoning
    target_tokens: torch.Tensor  # [T] VQ tokens of the target image


def prepare_example(mm, record: Record, subject_source: str) -> Example:
    references = record.load_references()
    subject_tokens = extract_subject(mm, references, subject_source)
    grounding = build_sequence(mm, record.prompt, references, stage="ground")
    sequence = build_sequence(mm, record.prompt, references, reasoning=record.reasoning, subject_tokens=subject_tokens)
    check_fits(mm, sequence, mm.num_image_tokens)
    after = sequence.input_ids[len(grounding):]
    text_end = len(grounding) + int((after == mm.tokens.begin_of_image).nonzero()[0])
    target_tokens = mm.encode_image_tokens([record.load_target()])[0].cpu()
    return Example(sequence, len(grounding), text_end, target_tokens)


def sft_loss(mm, examples: list[Example], unconditional: list[bool], text_weight: float, image_weight: float):
    """Weighted per-segment mean cross-entropies; returns (loss, text loss, image loss) as tensors."""
    rows = []
    for example, drop in zip(examples, unconditional):
        context = embed_sequence(mm, example.sequence, unconditional=drop)
        rows.append(torch.cat([context, mm.embed_image_tokens(example.target_tokens[:-1]).to(context.dtype)]))
    prefix = batch_prefix(mm, rows)
    hidden = mm.language_model(
        inputs_embeds=prefix.embeds, attention_mask=prefix.attention_mask, position_ids=prefix.position_ids,
        use_cache=False,
    ).last_hidden_state
    text_hidden, text_labels, image_hidden, image_labels = [], [], [], []
    for row, (example, drop, embeds) in enumerate(zip(examples, unconditional, rows)):
        offset = hidden.shape[1] - embeds.shape[0]
        context_length = len(example.sequence)
        if not drop:
            positions = torch.arange(example.text_start, example.text_end + 1)
            text_hidden.append(hidden[row, offset + positions - 1])
            text_labels.append(example.sequence.input_ids[positions])
        image_hidden.append(hidden[row, offset + context_length - 1 : offset + context_length - 1 + len(example.target_tokens)])
        image_labels.append(example.target_tokens)
    device = hidden.device
    image_loss = F.cross_entropy(mm.image_logits(torch.cat(image_hidden)).float(), torch.cat(image_labels).to(device))
    text_loss = (
        F.cross_entropy(mm.text_logits(torch.cat(text_hidden)).float(), torch.cat(text_labels).to(device))
        if text_hidden
        else image_loss.new_zeros(())
    )
    return text_weight * text_loss + image_weight * image_loss, text_loss, image_loss


def trainable_parameters(mm) -> list[torch.nn.Parameter]:
    """Everything but the understanding encoder and the VQ tokenizer, which stay frozen."""
    frozen = {id(p) for module in (mm.model.model.vision_model, mm.model.model.vqmodel) for p in module.parameters()}
    for parameter in mm.model.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    return [p for p in mm.model.parameters() if p.requires_grad]


def train(config: SFTConfig) -> Path:
    """Run SFT; returns the final checkpoint folder."""
    from tqdm.auto import tqdm

    from mmr1.loading import load_model

    records = read_records(config.data, require=("target", "reasoning"))
    torch.manual_seed(config.seed)
    mm = load_model(config.model, dtype=config.dtype, device=config.device)
    examples = [prepare_example(mm, record, config.subject_source) for record in records]
    mm.model.train()
    if config.gradient_checkpointing:
        mm.model.gradient_checkpointing_enable()
    parameters = trainable_parameters(mm)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(config.warmup_steps, 1))
    )
    rng = random.Random(config.seed)
    order: list[int] = []
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    metrics_path = output / "metrics.jsonl"
    started = time.perf_counter()
    with metrics_path.open("w", encoding="utf-8") as metrics, tqdm(total=config.steps, desc="sft", unit="step") as bar:
        for step in range(1, config.steps + 1):
            totals = torch.zeros(3)
            for _ in range(config.gradient_accumulation):
                batch = []
                while len(batch) < min(config.batch_size, len(examples)):
                    if not order:
                        order = rng.sample(range(len(examples)), len(examples))
                    batch.append(examples[order.pop()])
                unconditional = [rng.random() < config.unconditional_prob for _ in batch]
                losses = sft_loss(mm, batch, unconditional, config.text_weight, config.image_weight)
                (losses[0] / config.gradient_accumulation).backward()
                totals += torch.stack([loss.detach().float().cpu() for loss in losses]) / config.gradient_accumulation
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{totals[0]:.3f}")
            if step % config.log_every == 0 or step == 1 or step == config.steps:
                line = {"step": step, "loss": float(totals[0]), "text_loss": float(totals[1]),
                        "image_loss": float(totals[2]), "lr": scheduler.get_last_lr()[0],
                        "seconds": round(time.perf_counter() - started, 3)}
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
            if config.save_every and step % config.save_every == 0 and step != config.steps:
                save_recipe_checkpoint(mm, output / f"step-{step:06d}", "sft", config_to_dict(config), step)
    return save_recipe_checkpoint(mm, output / "final", "sft", config_to_dict(config), config.steps)


def main(argv: list[str] | None = None) -> int:
    return recipe_main(SFTConfig, "Cold-start X-CoT SFT (teacher forcing on reasoning and image tokens).", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
