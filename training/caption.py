"""Cold-start X-CoT reasoning for records that have none, written by the model's own grounding.

    python -m training.data caption RECORDS.jsonl --model FOLDER --out CAPTIONED.jsonl [--batch-size 8]

SFT teaches the reasoning text from each record's `reasoning`; photos alone have none. This reads each record's
references and prompt through `mmr1.xcot.ground_batch` (batched, a progress bar per record) and writes the record
with the grounding's reasoning. Record i (in file order) is seeded seed + i, so the text does not depend on the
batch size or on where a run was resumed. The output is rewritten whole (atomically) after every batch: a killed
run leaves a valid file of the records done so far, and running the same command again goes on from there.
Records that already have a reasoning keep it unless `overwrite`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mmr1.errors import InputError

from .data import Record, absolute_path, read_records, write_records


def _runs(positions: list[int]) -> list[list[int]]:
    """Consecutive positions grouped: one ground_batch call each, so that row i's seed is seed + its position."""
    runs: list[list[int]] = []
    for position in positions:
        if runs and runs[-1][-1] == position - 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    return runs


def caption_records(source: str | Path, out: str | Path, model: str | Path, batch_size: int = 8,
                    max_new_tokens: int = 256, temperature: float = 0.7, seed: int = 0, device: str | None = None,
                    dtype: str = "auto", overwrite: bool = False) -> str:
    """Write `out`: the records of `source`, each with the model's reasoning; returns the summary line."""
    from tqdm.auto import tqdm

    from mmr1.loading import load_model
    from mmr1.xcot import ground_batch

    source, out = absolute_path(source), absolute_path(out)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    if out == source:
        raise InputError("--out must be another file than the records read; the source stays as it is.")
    records = read_records(source)
    done: dict[str, Record] = {}
    if out.is_file():  # a run to resume: its records must be this source's
        ids = {record.id for record in records}
        done = {record.id: record for record in read_records(out)}
        strangers = sorted(set(done) - ids)
        if strangers:
            raise InputError(f"{out} holds records that {source} lacks ({', '.join(strangers[:5])}); it is not a "
                             "caption run of this file: choose another --out.")
    todo: list[int] = []
    for position, record in enumerate(records):
        if record.id in done:
            continue
        if overwrite or record.reasoning is None:
            todo.append(position)
        else:
            done[record.id] = record  # its own reasoning, kept
    mm = load_model(model, dtype=dtype, device=device) if todo else None
    with tqdm(total=len(todo), desc="caption", unit="record") as bar:
        for start in range(0, len(todo), batch_size):
            for run in _runs(todo[start : start + batch_size]):
                batch = [records[position] for position in run]
                groundings = ground_batch(mm, [record.load_references() for record in batch],
                                          [record.prompt for record in batch], max_new_tokens=max_new_tokens,
                                          temperature=temperature, seed=seed + run[0])
                for record, grounding in zip(batch, groundings):
                    done[record.id] = replace(record, reasoning=grounding.reasoning)
                bar.update(len(batch))
            write_records(out, [done[record.id] for record in records if record.id in done])
    if not todo:
        write_records(out, [done[record.id] for record in records])
    return f"{out}: {len(records)} records, {len(todo)} captioned now by {model}"
