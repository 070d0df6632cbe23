"""Cold-start SFT for X-CoT: teacher-forced loss on the reasoning tokens, on the subject image's VQ tokens (when
the model draws it) and on the target image's VQ tokens.

One training sequence is the X-CoT chain of `mmr1.prompting.build_sequence` followed by the target image:

    [user turn: references, request] <|Assistant|>: reasoning "\\n" <begin_of_image> [subject] ... <begin_of_image> target tokens
                                                    |-------- text segment --------||- subject -|               |-- image --|

The text segment (the reasoning up to and including the <begin_of_image> that ends it, where grounding stops)
is scored by the language head, the subject and image segments by the generation head. The subject segment is
trained under `subject_source = "generate"` only: the records' `subject_image` (the subject alone) is what the
model learns to draw after its reasoning; under "reference" those slots hold a reference's tokens, given, not
predicted. Each segment's loss is a mean over its own tokens and they are weighted, so 576 image tokens do not
drown 50 reasoning tokens. With probability
`unconditional_prob` an example's image segment sees the unconditional (padded) context instead, which keeps
classifier-free guidance meaningful. With probability `reasoning_drop_prob` it sees the references without
the reasoning (and has no text loss), so the same model can also generate straight from references: the
baseline that the world evaluation compares X-CoT against. With probability `reference_drop_prob` a whole
micro-batch is drawn without its references: the prompt alone, the true reasoning, the subject and the image
(Janus's own text-to-image turn, about half as long), so the generator learns from the reasoning at about half
the cost; no reasoning is taught without the references it describes.

    python -m training.sft --config training/configs/sft.toml
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from mmr1.prompting import VQ_IMAGE, PromptSequence, batch_prefix, build_sequence, check_fits, embed_sequence
from mmr1.generation import generate
from mmr1.xcot import extract_subject, ground

from .config import AT_LEAST_ONE, AT_LEAST_ZERO, PROBABILITY, knob, recipe_main
from .data import Record, RecordOrder, read_records
from .engine import Run, RunConfig
from .plots import sample_grid
from .policy import make_policy


@dataclass(frozen=True)
class SFTConfig(RunConfig):
    output_dir: Path = knob(Path("runs/sft"), "checkpoints, metrics.jsonl and curves.png go here")
    steps: int = knob(200, "optimizer steps")
    learning_rate: float = knob(1e-4, "AdamW peak learning rate")
    warmup_steps: int = knob(10, "linear learning-rate warmup steps")
    log_every: int = knob(10, "steps between metrics lines")
    batch_size: int = knob(4, "records per micro-batch and process", within=AT_LEAST_ONE)
    gradient_accumulation: int = knob(1, "micro-batches per optimizer step", within=AT_LEAST_ONE)
    text_weight: float = knob(1.0, "weight of the reasoning (text) segment's mean loss", within=AT_LEAST_ZERO)
    image_weight: float = knob(1.0, "weight of the image segment's mean loss", within=AT_LEAST_ZERO)
    subject_weight: float = knob(1.0, "weight of the subject image segment's mean loss (subject_source = generate)",
                                 within=AT_LEAST_ZERO)
    unconditional_prob: float = knob(0.1, "probability that an example's image segment sees the padded context",
                                     within=PROBABILITY)
    reasoning_drop_prob: float = knob(0.0, "probability that an example is drawn from references without reasoning",
                                      within=PROBABILITY)
    reference_drop_prob: float = knob(0.0, "probability that a micro-batch is drawn without references (prompt, "
                                           "reasoning, subject, image; no text loss): shorter rows for the generator",
                                      within=PROBABILITY)

    def __post_init__(self) -> None:
        self.check_run_keys()


@dataclass
class Example:
    """One record prepared for teacher forcing."""

    sequence: PromptSequence  # the X-CoT chain up to the <begin_of_image> of the new image
    text_start: int  # first position of the reasoning segment
    text_end: int  # last position of it: the <begin_of_image> that ends the reasoning
    target_tokens: torch.Tensor  # [T] VQ tokens of the target image
    without_reasoning: PromptSequence  # the same chain with the reasoning left out (no text loss)
    without_references: PromptSequence  # the prompt alone, the reasoning and the subject (no text loss)
    draws_subject: bool = False  # the model learns to draw the subject image (subject_source = generate)


def subject_slot(sequence: PromptSequence) -> int:
    """First VQ slot of a chain: its subject image (the target's slots come after the sequence)."""
    return int((sequence.slot_kinds == VQ_IMAGE).nonzero()[0])


def prepare_example(mm, record: Record, subject_source: str) -> Example:
    references = record.load_references()
    subject_tokens = extract_subject(mm, references, subject_source)
    if subject_source == "generate":
        subject_tokens = mm.encode_image_tokens([record.load_subject_image()]).cpu()
    grounding = build_sequence(mm, record.prompt, references, stage="ground")
    sequence = build_sequence(mm, record.prompt, references, reasoning=record.reasoning, subject_tokens=subject_tokens)
    check_fits(mm, sequence, mm.num_image_tokens)
    after = sequence.input_ids[len(grounding):]
    text_end = len(grounding) + int((after == mm.tokens.begin_of_image).nonzero()[0])
    target_tokens = mm.encode_image_tokens([record.load_target()])[0].cpu()
    # without reasoning the chain draws no subject image either: the drawn subject is a product of the reasoning
    bare_subject = None if subject_source == "generate" else subject_tokens
    without = build_sequence(mm, record.prompt, references, reasoning="", subject_tokens=bare_subject)
    unreferenced = build_sequence(mm, record.prompt, reasoning=record.reasoning, subject_tokens=subject_tokens)
    return Example(sequence, len(grounding), text_end, target_tokens, without, unreferenced,
                   draws_subject=subject_source == "generate")


def sft_loss(
    mm,
    examples: list[Example],
    unconditional: list[bool],
    text_weight: float,
    image_weight: float,
    no_reasoning: list[bool] | None = None,
    subject_weight: float = 1.0,
    no_references: list[bool] | None = None,
):
    """Weighted per-segment mean cross-entropies; returns (loss, text loss, image loss, subject loss) as tensors
    (a segment without tokens in the batch has loss 0).

    `unconditional[i]`: example i's image sees the padded context; `no_reasoning[i]`: it sees the references
    without reasoning. Either way it has no text or subject loss. `no_references[i]`: it sees the prompt alone
    with the reasoning (no text loss; the subject segment is taught)."""
    no_reasoning = no_reasoning or [False] * len(examples)
    no_references = no_references or [False] * len(examples)
    rows, sequences = [], []
    for example, drop, bare, unreferenced in zip(examples, unconditional, no_reasoning, no_references):
        sequences.append(example.without_references if unreferenced else
                         example.without_reasoning if bare else example.sequence)
        context = embed_sequence(mm, sequences[-1], unconditional=drop)
        rows.append(torch.cat([context, mm.embed_image_tokens(example.target_tokens[:-1]).to(context.dtype)]))
    prefix = batch_prefix(mm, rows)
    hidden = mm.language_model(
        inputs_embeds=prefix.embeds, attention_mask=prefix.attention_mask, position_ids=prefix.position_ids,
        use_cache=False,
    ).last_hidden_state
    text_hidden, text_labels, image_hidden, image_labels, subject_hidden, subject_labels = [], [], [], [], [], []
    for row, (example, drop, bare, unreferenced, embeds) in enumerate(
            zip(examples, unconditional, no_reasoning, no_references, rows)):
        sequence = sequences[row]
        offset = hidden.shape[1] - embeds.shape[0]
        context_length = len(sequence)
        if not drop and not bare and not unreferenced:
            positions = torch.arange(example.text_start, example.text_end + 1)
            text_hidden.append(hidden[row, offset + positions - 1])
            text_labels.append(example.sequence.input_ids[positions])
        if not drop and not bare and example.draws_subject:
            tokens, start = sequence.subject_tokens[0], subject_slot(sequence)
            positions = torch.arange(start, start + len(tokens))
            subject_hidden.append(hidden[row, offset + positions - 1])
            subject_labels.append(tokens)
        image_hidden.append(hidden[row, offset + context_length - 1 : offset + context_length - 1 + len(example.target_tokens)])
        image_labels.append(example.target_tokens)
    device = hidden.device
    image_loss = F.cross_entropy(mm.image_logits(torch.cat(image_hidden)).float(), torch.cat(image_labels).to(device))
    text_loss = (
        F.cross_entropy(mm.text_logits(torch.cat(text_hidden)).float(), torch.cat(text_labels).to(device))
        if text_hidden
        else image_loss.new_zeros(())
    )
    subject_loss = (
        F.cross_entropy(mm.image_logits(torch.cat(subject_hidden)).float(), torch.cat(subject_labels).to(device))
        if subject_hidden
        else image_loss.new_zeros(())
    )
    loss = text_weight * text_loss + image_weight * image_loss + subject_weight * subject_loss
    return loss, text_loss, image_loss, subject_loss


SAMPLED_RECORDS = 4


@torch.no_grad()
def sample_records(mm, records: list[Record], config: SFTConfig, synced: bool = False) -> Image.Image:
    """The model's own X-CoT on the first records (its reasoning, then the image), as a grid for samples/.

    Every process draws it; `synced` keeps their forwards in step where reasoning stops early (sample_tokens)."""
    training = mm.model.training
    mm.model.eval()
    images = []
    for record in records[:SAMPLED_RECORDS]:
        grounding = ground(mm, record.load_references(), record.prompt, max_new_tokens=64, seed=config.seed,
                           subject_source=config.subject_source, synced=synced)
        images.append(generate(mm, record.prompt, grounding, seed=config.seed, synced=synced).images[0])
    mm.model.train(training)
    return sample_grid(torch.stack(images), [record.id for record in records[:SAMPLED_RECORDS]])


def train(config: SFTConfig) -> Path:
    """Run SFT (resuming from output_dir when it holds a checkpoint); returns the final checkpoint folder."""
    from tqdm.auto import tqdm

    from mmr1.loading import load_model

    records = read_records(config.data, require=("target", "reasoning")
                           + (("subject_image",) if config.subject_source == "generate" else ()))
    run = Run("sft", config, accumulation_steps=config.gradient_accumulation)
    mm = load_model(config.model, dtype="fp32", device=run.device)  # fp32 master weights; bf16 is autocast
    examples = [prepare_example(mm, record, config.subject_source) for record in records]
    policy = make_policy(mm, config.model, config.lora, with_reference=False)
    objective = run.prepare(policy, lambda batch, unconditional, no_reasoning, no_references: sft_loss(
        mm, batch, unconditional, config.text_weight, config.image_weight, no_reasoning, config.subject_weight,
        no_references))
    order = RecordOrder(len(examples), config.seed)
    start = run.resume(order)
    mm.model.train()
    share = min(config.batch_size, len(examples))
    started = time.perf_counter()
    with tqdm(total=config.steps, initial=start, desc="sft", unit="step", disable=not run.is_main) as bar:
        for step in range(start + 1, config.steps + 1):
            totals = torch.zeros(4)
            for micro in range(config.gradient_accumulation):
                indices = order.take(share * run.num_processes)[run.process_index * share:][:share]
                draws = random.Random(f"{config.seed}-{step}-{micro}-{run.process_index}")
                unconditional = [draws.random() < config.unconditional_prob for _ in indices]
                no_reasoning = [draws.random() < config.reasoning_drop_prob for _ in indices]
                if draws.random() < config.reference_drop_prob:  # a whole micro-batch: its rows are all short
                    no_reasoning, no_references = [False] * len(indices), [True] * len(indices)
                else:
                    no_references = [False] * len(indices)
                with run.micro_step(last=micro == config.gradient_accumulation - 1):
                    losses = objective([examples[index] for index in indices], unconditional, no_reasoning,
                                       no_references)
                    run.backward(losses[0] / config.gradient_accumulation)
                totals += torch.stack([loss.detach().float().cpu() for loss in losses]) / config.gradient_accumulation
            run.check_loss(step, float(totals[0]))
            grad_norm = run.optimizer_step()
            totals = run.gather(totals.unsqueeze(0)).mean(dim=0)
            bar.update(1)
            bar.set_postfix(loss=f"{totals[0]:.3f}")
            if run.log_due(step):
                run.log({"step": step, "loss": float(totals[0]), "text_loss": float(totals[1]),
                         "image_loss": float(totals[2]), "subject_loss": float(totals[3]), "lr": run.learning_rate,
                         "grad_norm": grad_norm, "seconds": round(time.perf_counter() - started, 3)})
            if run.samples_due(step):
                with run.generation_weights():
                    grid = sample_records(mm, records, config, synced=run.num_processes > 1)
                run.save_samples(step, grid)
            run.end_of_step(step, order)
    return run.finish(("loss", "text_loss", "image_loss", "subject_loss"))


def main(argv: list[str] | None = None) -> int:
    return recipe_main(SFTConfig, "Cold-start X-CoT SFT (teacher forcing on reasoning and image tokens).", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
