"""Cold-start SFT on the tiny model: segment bookkeeping, an overfit run, config errors, loadable checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmr1.loading import load_model
from mmr1.xcot import format_reasoning
from tests.conftest import CONTROL_TOKEN_TEXT
from training.config import ConfigError, build_config
from training.data import Record, write_records
from training.sft import SFTConfig, main, prepare_example, sft_loss, subject_slot, train

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def square(colour, background=(240, 240, 240), size=32) -> Image.Image:
    array = np.full((size, size, 3), background, dtype=np.uint8)
    array[8:24, 8:24] = colour
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four subjects: a coloured square as reference, the same square on another background as target."""
    folder = tmp_path_factory.mktemp("sft_data")
    records = []
    for name, colour in COLOURS.items():
        square(colour).save(folder / f"{name}_ref.png")
        square(colour, background=(250, 220, 160)).save(folder / f"{name}_target.png")
        records.append(Record(
            id=name, references=(folder / f"{name}_ref.png",), prompt="it on sand",
            target=folder / f"{name}_target.png", subject="square",
            reasoning=format_reasoning(f"a {name} square", f"{name} square", f"a {name} square on sand"),
        ))
    write_records(folder / "train.jsonl", records)
    return folder / "train.jsonl"


def test_segments_cover_the_reasoning_up_to_the_image_start(tiny_model, dataset):
    from training.data import read_records

    record = read_records(dataset)[0]
    example = prepare_example(tiny_model, record, "reference")
    text = tiny_model.tokenizer.decode(example.sequence.input_ids[example.text_start : example.text_end + 1])
    assert text.startswith(" <think>a red square</think>") and text.endswith("<begin_of_image>")
    assert example.sequence.input_ids[example.text_end] == tiny_model.tokens.begin_of_image
    assert example.target_tokens.shape == (tiny_model.num_image_tokens,)


def test_control_token_strings_in_a_record_are_taught_as_inference_feeds_them(tiny_model, tmp_path):
    """A record whose prompt and reasoning hold every control token's string is encoded as generation encodes
    them, as text: the taught segment is the whole reasoning, up to the template's own image start."""
    from mmr1.generation import generation_sequence
    from mmr1.tokens import BEGIN_OF_IMAGE
    from mmr1.xcot import Grounding, extract_subject
    from training.data import read_records

    square(COLOURS["red"]).save(tmp_path / "ref.png")
    square(COLOURS["red"], background=(250, 220, 160)).save(tmp_path / "target.png")
    reasoning = format_reasoning(CONTROL_TOKEN_TEXT, "red square", f"{BEGIN_OF_IMAGE} on sand")
    write_records(tmp_path / "train.jsonl", [Record(
        id="forged", references=(tmp_path / "ref.png",), prompt=f"it on sand {CONTROL_TOKEN_TEXT}",
        target=tmp_path / "target.png", reasoning=reasoning,
    )])
    record = read_records(tmp_path / "train.jsonl")[0]
    example = prepare_example(tiny_model, record, "reference")
    taught = example.sequence.input_ids[example.text_start : example.text_end + 1]
    assert tiny_model.tokenizer.decode(taught) == f" {reasoning}\n{BEGIN_OF_IMAGE}"
    references = record.load_references()
    grounding = Grounding(record.prompt, reasoning, "", "", False, references, extract_subject(tiny_model, references))
    assert torch.equal(example.sequence.input_ids, generation_sequence(tiny_model, record.prompt, grounding).input_ids)


def test_padding_and_dropped_context_only_change_what_they_should(tiny_model, dataset):
    from training.data import read_records

    examples = [prepare_example(tiny_model, record, "reference") for record in read_records(dataset)[:2]]
    with torch.no_grad():
        alone = sft_loss(tiny_model, examples[:1], [False], 1.0, 1.0)
        dropped = sft_loss(tiny_model, examples[:1], [True], 1.0, 1.0)
    assert alone[1] > 0 and dropped[1] == 0  # no text loss without the context
    assert not torch.isclose(alone[2], dropped[2])


@pytest.fixture(scope="module")
def dataset_with_subjects(tmp_path_factory, dataset):
    """The same records with each square alone on grey as the subject image (subject_source = generate)."""
    from dataclasses import replace

    from training.data import read_records

    folder = tmp_path_factory.mktemp("sft_subjects")
    records = []
    for record in read_records(dataset):
        path = folder / f"{record.id}_alone.png"
        square(COLOURS[record.id], background=(128, 128, 128)).save(path)
        records.append(replace(record, subject_image=path))
    write_records(folder / "train.jsonl", records)
    return folder / "train.jsonl"


def test_generate_source_teaches_the_subject_image_after_the_reasoning(tiny_model, dataset_with_subjects):
    from mmr1.prompting import VQ_IMAGE
    from training.data import read_records

    record = read_records(dataset_with_subjects, require=("subject_image",))[0]
    example = prepare_example(tiny_model, record, "generate")
    subject = tiny_model.encode_image_tokens([record.load_subject_image()])[0].cpu()
    slots = (example.sequence.slot_kinds == VQ_IMAGE).nonzero().flatten()
    assert example.draws_subject
    assert int(slots[0]) == subject_slot(example.sequence) == example.text_end + 1  # right after the reasoning's <boi>
    torch.testing.assert_close(example.sequence.subject_tokens[0], subject)
    with torch.no_grad():
        full = sft_loss(tiny_model, [example], [False], 1.0, 1.0)
        dropped = sft_loss(tiny_model, [example], [True], 1.0, 1.0)
        given = sft_loss(tiny_model, [prepare_example(tiny_model, record, "reference")], [False], 1.0, 1.0)
    assert full[3] > 0 and dropped[3] == 0 and given[3] == 0  # only a drawn subject is a segment of its own
    torch.testing.assert_close(full[0], full[1] + full[2] + full[3])


def test_rows_without_references_teach_the_subject_and_image_from_the_reasoning_alone(tiny_model, dataset_with_subjects):
    """reference_drop_prob's rows: Janus's text-to-image turn (no reference slots, no grounding instruction) with
    the true reasoning; no reasoning is taught there, the drawn subject and the image are."""
    from mmr1.prompting import UNDERSTANDING
    from training.data import read_records

    record = read_records(dataset_with_subjects, require=("subject_image",))[0]
    example = prepare_example(tiny_model, record, "generate")
    short, chain = example.without_references, example.sequence
    assert not (short.slot_kinds == UNDERSTANDING).any() and len(short) < len(chain) - 20
    torch.testing.assert_close(short.subject_tokens, chain.subject_tokens)
    reasoning = tiny_model.tokenizer.decode(short.input_ids)
    assert record.reasoning in reasoning and "The images show one subject" not in reasoning
    with torch.no_grad():
        unreferenced = sft_loss(tiny_model, [example], [False], 1.0, 1.0, [False], 1.0, [True])
        full = sft_loss(tiny_model, [example], [False], 1.0, 1.0)
    assert unreferenced[1] == 0 and unreferenced[3] > 0 and unreferenced[2] > 0
    assert not torch.isclose(unreferenced[2], full[2])  # the image saw another context


def test_sft_under_generate_needs_subject_images_and_lowers_the_subject_loss(dataset, dataset_with_subjects,
                                                                               tiny_hf_dir, tmp_path):
    from mmr1.errors import InputError

    values = {"model": str(tiny_hf_dir), "output_dir": str(tmp_path / "run"), "steps": 40, "batch_size": 4,
              "learning_rate": 3e-3, "warmup_steps": 3, "unconditional_prob": 0.0, "log_every": 5, "device": "cpu",
              "subject_source": "generate"}
    with pytest.raises(InputError, match="lack 'subject_image'"):
        train(build_config(SFTConfig, {**values, "data": str(dataset)}))
    train(build_config(SFTConfig, {**values, "data": str(dataset_with_subjects)}))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["subject_loss"] < 0.4 * lines[0]["subject_loss"]  # 2.58 / 5.69 after 30 steps


def test_a_corrupt_image_stops_sft_before_the_model_loads(dataset, tmp_path, monkeypatch, capsys):
    """Every record's images are decoded when the data is read: a truncated target ends the command with one
    error line naming the file and its line, before a model loads or a step runs (issue 16, item 12)."""
    import shutil

    from tests.training.test_config import error_line

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr("mmr1.loading.load_model", refuse)
    folder = tmp_path / "data"
    shutil.copytree(dataset.parent, folder)
    target = folder / "blue_target.png"
    target.write_bytes(target.read_bytes()[:60])  # the header intact: it opens, and cannot decode
    line = error_line(main, ["--model", "m", "--data", str(folder / dataset.name),
                             "--output_dir", str(tmp_path / "run")], capsys)
    assert str(target) in line and "line 3" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sft_overfits_a_handful_of_samples(dataset, tiny_hf_dir, tmp_path):
    """The acceptance bound: loss down by at least 90 % on four samples within 60 steps."""
    config = build_config(SFTConfig, {
        "model": str(tiny_hf_dir), "data": str(dataset), "output_dir": str(tmp_path / "run"), "steps": 60,
        "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 5, "unconditional_prob": 0.0, "log_every": 5,
        "device": "cpu", "sample_every": 30,
    })
    final = train(config)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0]["loss"], lines[-1]["loss"]
    assert last <= 0.1 * first, (first, last)
    assert lines[-1]["text_loss"] < 0.1 * lines[0]["text_loss"] and lines[-1]["image_loss"] < 0.1 * lines[0]["image_loss"]
    # The checkpoint loads through the same path as any Janus folder, and generates.
    from mmr1.generation import generate

    mm = load_model(final, device="cpu")
    assert json.loads((final / "mmr1_training.json").read_text())["step"] == 60
    assert generate(mm, "it on sand", num_images=1).images.shape == (1, 32, 32, 3)
    assert not any(path.name.startswith(".") for path in (tmp_path / "run").iterdir())  # no partial checkpoint
    grids = sorted(path.name for path in (tmp_path / "run" / "samples").iterdir())
    assert grids == ["step-000030.png", "step-000060.png"]
    assert Image.open(tmp_path / "run" / "samples" / grids[-1]).size[0] == 4 * 32  # the 4 records side by side
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"data": "x.jsonl"}, "'model'"),
        ({"model": "m", "data": "d", "stepz": 3}, "stepz"),
        ({"model": "m", "data": "d", "steps": "many"}, "'steps'"),
        ({"model": "m", "data": "d", "unconditional_prob": 1.5}, "unconditional_prob"),
    ],
)
def test_bad_configs_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(SFTConfig, values)


def test_cli_help_lists_every_knob_and_bad_config_fails_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert all(f"--{name}" in help_text for name in SFTConfig.__dataclass_fields__)
    config = tmp_path / "bad.toml"
    config.write_text('model = "/nowhere"\ndata = "/nowhere.jsonl"\nlearning_rat = 0.1\n')
    assert main(["--config", str(config)]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_extending_a_finished_run_equals_a_longer_run(dataset, tiny_hf_dir, tmp_path):
    """A finished run given more steps resumes from its last checkpoint (weights, AdamW moments, schedule, data
    position and the context-drop draws) and ends where a run that had the longer schedule from the start ends."""
    from safetensors.torch import load_file

    def sft(output, steps):
        return train(build_config(SFTConfig, {
            "model": str(tiny_hf_dir), "data": str(dataset), "output_dir": str(output), "steps": steps,
            "batch_size": 3, "gradient_accumulation": 2, "learning_rate": 1e-3, "warmup_steps": 3,
            "unconditional_prob": 0.3, "device": "cpu", "seed": 4,
        }))

    sft(tmp_path / "extended", 3)
    extended = load_file(sft(tmp_path / "extended", 5) / "model.safetensors")
    direct = load_file(sft(tmp_path / "direct", 5) / "model.safetensors")
    assert all(torch.equal(extended[key], direct[key]) for key in direct)
    steps = [json.loads(line)["step"] for line in (tmp_path / "extended" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3, 5]
