"""Cold-start reasoning written by the model's own grounding: batched, seeded by record, resumable after a crash."""

from __future__ import annotations

import pytest

import mmr1.xcot
from mmr1.errors import InputError
from tests.conftest import subject_image
from training.caption import caption_records
from training.data import Record, read_records, write_records

KEPT = "<think>given</think><subject>a red box</subject><scene>on a table</scene>"


@pytest.fixture
def records(tmp_path):
    photos = []
    for index in range(3):
        photos.append(tmp_path / f"photo{index}.png")
        subject_image(colour=(60 * index, 40, 40)).save(photos[-1])
    rows = [Record(id=f"r{index}", references=(photos[index % 3],), prompt=f"a photo of it, take {index}",
                   reasoning=KEPT if index == 2 else None) for index in range(5)]
    write_records(tmp_path / "records.jsonl", rows)
    return tmp_path / "records.jsonl"


def caption(records, out, model, **options):
    return caption_records(records, out, model, max_new_tokens=12, device="cpu", dtype="fp32", **options)


def test_every_record_gets_the_models_reasoning_independent_of_the_batch_size(records, tiny_hf_dir, tmp_path):
    summary = caption(records, tmp_path / "a.jsonl", tiny_hf_dir, batch_size=2)
    assert summary.endswith(f"5 records, 4 captioned now by {tiny_hf_dir}")
    written = read_records(tmp_path / "a.jsonl")
    assert [record.id for record in written] == ["r0", "r1", "r2", "r3", "r4"]
    assert written[2].reasoning == KEPT  # a record's own reasoning is kept
    assert all(record.reasoning for record in written)
    caption(records, tmp_path / "b.jsonl", tiny_hf_dir, batch_size=3)
    assert [r.reasoning for r in read_records(tmp_path / "b.jsonl")] == [r.reasoning for r in written]


def test_a_killed_run_leaves_a_valid_file_and_resumes_to_the_same_result(records, tiny_hf_dir, tmp_path, monkeypatch):
    caption(records, tmp_path / "whole.jsonl", tiny_hf_dir, batch_size=2)
    real, calls = mmr1.xcot.ground_batch, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second batch
        return real(*args, **kwargs)

    monkeypatch.setattr(mmr1.xcot, "ground_batch", crashing)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        caption(records, out, tiny_hf_dir, batch_size=2)
    # the first batch, whole, and r2, whose own reasoning is kept
    assert [record.id for record in read_records(out)] == ["r0", "r1", "r2"]
    monkeypatch.setattr(mmr1.xcot, "ground_batch", real)
    assert caption(records, out, tiny_hf_dir, batch_size=2).endswith("2 captioned now by " + str(tiny_hf_dir))
    assert read_records(out) == read_records(tmp_path / "whole.jsonl")


def test_an_output_of_another_dataset_is_not_resumed(records, tiny_hf_dir, tmp_path):
    other = tmp_path / "other.jsonl"
    write_records(other, [Record(id="stranger", references=(tmp_path / "photo0.png",), prompt="x")])
    with pytest.raises(InputError, match="holds records that .* lacks \\(stranger\\)"):
        caption(records, other, tiny_hf_dir)
    with pytest.raises(InputError, match="another file"):
        caption(records, records, tiny_hf_dir)
