"""training.embedded: every stage of the embedded model's pipeline in miniature, resumable, then installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import ConfigError, build_config
from training.embedded import DONE, EmbeddedConfig, Pipeline, install, world_corpus

STAGES = ("components", "judge", "reward", "base", "data", "sft", "grpo", "eval")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("world")
    config = EmbeddedConfig(
        output_dir=tmp_path / "run", scenes=64, vq_steps=2, vq_full_steps=1, understanding_steps=2, judge_steps=2,
        reward_steps=2, sft_records=4, grpo_records=2, eval_tasks=1,
        sft_config=_strip_and_override(tmp_path, "sft.toml", {"steps": 2, "batch_size": 2, "save_every": 0}),
        grpo_config=_strip_and_override(tmp_path, "grpo.toml", {"steps": 1, "num_generations": 2,
                                                                 "prompts_per_step": 1, "save_every": 0}),
    )
    return config, Pipeline(config).run()


def _strip_and_override(tmp_path: Path, name: str, values: dict) -> Path:
    """The shipped world recipe with some keys replaced (TOML forbids a key twice, so drop them first)."""
    lines = (Path("training/configs/world") / name).read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.split(" = ")[0] not in values]
    path = tmp_path / name
    path.write_text("\n".join(kept + [f"{key} = {value}" for key, value in values.items()]) + "\n", encoding="utf-8")
    return path


def test_every_stage_completes_and_records_itself(finished_run):
    config, out = finished_run
    for stage in STAGES:
        record = json.loads((out / stage / DONE).read_text())
        assert record["seconds"] >= 0
    report = json.loads((out / "eval" / "report.json").read_text())
    assert len(report["rows"]) == 4 and (out / "eval" / "contact_sheet.png").is_file()
    judge = json.loads((out / "judge" / DONE).read_text())
    assert 0 <= judge["heldout_vq_reconstructions"]["subject"] <= 1


def test_a_finished_stage_is_skipped_when_the_command_runs_again(finished_run, capsys):
    config, out = finished_run
    before = {stage: (out / stage / DONE).stat().st_mtime_ns for stage in STAGES}
    Pipeline(config).run()
    assert {stage: (out / stage / DONE).stat().st_mtime_ns for stage in STAGES} == before
    assert capsys.readouterr().out.count("done earlier") == len(STAGES)


def test_install_copies_model_reward_and_judge_which_load(finished_run, tmp_path):
    from mmr1.loading import load_model
    from mmr1.rewards import load_reward_model
    from training.judge import load_judge

    _, out = finished_run
    target = install(out, tmp_path / "assets")
    mm = load_model(target / "mmr1-world")
    assert mm.image_size == 64 and mm.num_image_tokens == 64
    assert load_reward_model("clip_i", target / "mmr1-world-clip") is not None
    assert load_judge(target / "mmr1-world-judge") is not None
    with pytest.raises(ConfigError, match="missing"):
        install(tmp_path / "nothing", tmp_path / "other")


def test_the_world_tokenizer_keeps_world_words_whole():
    from mmr1.tiny import build_tokenizer

    tokenizer = build_tokenizer(768, world_corpus())
    for word in ("heart", "stripes", "purple", "wooden", "middle"):
        assert len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1, word


def test_bad_pipeline_values_name_the_key():
    with pytest.raises(ConfigError, match="vq_full_steps"):
        build_config(EmbeddedConfig, {"vq_steps": 10, "vq_full_steps": 11})
