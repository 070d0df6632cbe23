"""training.world.pipeline: every stage of the embedded model's pipeline in miniature, resumable, then installed;
its recipes found in the package and checked before the first stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import ConfigError, build_config
from training.world.evaluate import CONDITIONS
from training.world.pipeline import DONE, Pipeline, PipelineConfig, install, main, world_corpus
from training.world.recipes import CONFIGS, TEMPLATES
from training.world.scenes import IMAGE_SIZE

STAGES = ("components", "judge", "check_vq", "reward", "base", "data", "sft", "check_sft", "grpo", "eval")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("world")
    config = PipelineConfig(
        output_dir=tmp_path / "run", scenes=64, vq_steps=2, vq_full_steps=1, understanding_steps=2, judge_steps=2,
        reward_steps=2, sft_records=4, grpo_records=2, eval_tasks=1, gates=False,
        sft_config=_strip_and_override(tmp_path, "sft.toml", {"steps": 2, "batch_size": 2, "save_every": 0}),
        grpo_config=_strip_and_override(tmp_path, "grpo.toml", {"steps": 1, "num_generations": 2,
                                                                 "prompts_per_step": 1, "save_every": 0}),
    )
    return config, Pipeline(config).run()


def _strip_and_override(tmp_path: Path, name: str, values: dict) -> Path:
    """The shipped world recipe with some keys replaced (TOML forbids a key twice, so drop them first)."""
    lines = (CONFIGS / name).read_text(encoding="utf-8").splitlines()
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
    conditions = [name for name, _, _ in CONDITIONS]
    assert [m["measure"] for m in report["measures"] if m["measure"] in conditions] == conditions
    assert (out / "eval" / "contact_sheet.png").is_file()
    vq = json.loads((out / "check_vq" / DONE).read_text())
    assert [m["measure"] for m in vq["measures"]] == ["renders", "vq"] and vq["failed"]  # 2 VQ steps miss the bar
    sft = json.loads((out / "check_sft" / DONE).read_text())
    assert [m["measure"] for m in sft["measures"]] == ["grounding", "true reasoning + references",
                                                        "true reasoning, no references",
                                                        "subject image, true reasoning"]  # subject_source generate


def test_a_finished_stage_is_skipped_when_the_command_runs_again(finished_run, capsys):
    config, out = finished_run
    before = {stage: (out / stage / DONE).stat().st_mtime_ns for stage in STAGES}
    Pipeline(config).run()
    assert {stage: (out / stage / DONE).stat().st_mtime_ns for stage in STAGES} == before
    assert capsys.readouterr().out.count("done earlier") == len(STAGES)


def test_install_copies_model_reward_and_judge_which_load(finished_run, tmp_path):
    from mmr1.loading import load_model
    from mmr1.rewards import load_reward_model
    from training.world.judge import load_judge

    _, out = finished_run
    target = install(out, tmp_path / "assets")
    mm = load_model(target / "mmr1-world")
    assert mm.image_size == IMAGE_SIZE and mm.num_image_tokens == (IMAGE_SIZE // 4) ** 2  # tokens of 4x4 pixels
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
        build_config(PipelineConfig, {"vq_steps": 10, "vq_full_steps": 11})
    for values, key in (({"vq_base_channels": 48}, "vq_base_channels"),
                        ({"vq_channel_multiplier": [1, 2, 2, 2]}, "vq_channel_multiplier")):
        with pytest.raises(ConfigError, match=key):
            build_config(PipelineConfig, values)
    wide = build_config(PipelineConfig, {"vq_base_channels": 64, "vq_channel_multiplier": [2, 2, 4],
                                         "vq_codebook_size": 2048}).spec
    assert (wide.vq_base_channels, wide.vq_channel_multiplier, wide.vq_codebook_size) == (64, (2, 2, 4), 2048)


def test_recipes_come_from_the_package_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no training/ here
    out = tmp_path / "run"
    pipeline = Pipeline(PipelineConfig(output_dir=out))
    sft, grpo = pipeline.sft_recipe, pipeline.grpo_recipe
    sft_values, grpo_values = TEMPLATES["sft.toml"][3], TEMPLATES["grpo.toml"][3]  # what configs/*.toml hold
    assert (sft.steps, sft.learning_rate, grpo.steps, grpo.cfg_scale) == (
        sft_values["steps"], sft_values["learning_rate"], grpo_values["steps"], grpo_values["cfg_scale"])
    assert (sft.model, sft.data, sft.output_dir) == (out / "base", out / "data" / "sft" / "records.jsonl", out / "sft")
    assert (grpo.model, grpo.output_dir) == (out / "sft" / "final", out / "grpo")
    assert grpo.rewards == (f"clip_i={out / 'reward'}@1", f"clip_t={out / 'reward'}@0.5", "format@0.1")
    # a path that is not a packaged name is the user's own file, from the working directory
    text = (CONFIGS / "sft.toml").read_text()
    assert f"\nsteps = {sft_values['steps']}\n" in text
    (tmp_path / "mine.toml").write_text(text.replace(f"\nsteps = {sft_values['steps']}\n", "\nsteps = 5\n"))
    assert Pipeline(PipelineConfig(output_dir=out, sft_config=Path("mine.toml"))).sft_recipe.steps == 5
    with pytest.raises(ConfigError, match="missing.toml is neither a file of"):
        Pipeline(PipelineConfig(output_dir=out, grpo_config=Path("missing.toml")))
    assert not out.exists()  # nothing ran


@pytest.mark.parametrize("name, values, message", [
    ("sft.toml", {"stpes": 2}, "unknown key.*stpes"),
    ("sft.toml", {"batch_size": '"16"'}, "batch_size"),
    ("grpo.toml", {"num_generations": 1}, "num_generations"),
    ("grpo.toml", {"rewards": '["clip_j={reward}@1"]'}, "unknown kind 'clip_j'"),
    ("grpo.toml", {"rewards": '["bluenes@1"]'}, "Unknown reward 'bluenes'"),
])
def test_a_bad_recipe_fails_in_seconds_before_the_first_stage(tmp_path, capsys, name, values, message):
    bad = _strip_and_override(tmp_path, name, values)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        Pipeline(PipelineConfig(output_dir=out, **{name.replace(".toml", "_config"): bad}))
    assert main(["--output_dir", str(out), f"--{name.replace('.toml', '_config')}", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not out.exists()  # no stage started


def test_a_check_that_misses_its_bars_stops_the_run_before_sft_and_gates_false_goes_on(tmp_path, capsys):
    from dataclasses import replace

    from training.world.pipeline import PipelineStopped

    config = PipelineConfig(output_dir=tmp_path / "run", scenes=64, vq_steps=2, vq_full_steps=1,
                            understanding_steps=2, judge_steps=2, eval_tasks=2)
    with pytest.raises(PipelineStopped, match=r"(?s)check_vq.*vq subject: .* < 93 %.*--gates false"):
        Pipeline(config).run()
    out = config.output_dir
    assert (out / "check_vq" / "report.md").is_file() and not (out / "reward").exists()  # no later stage began
    assert "vq flat colours" in (out / "check_vq" / "report.md").read_text()
    capsys.readouterr()
    Pipeline(replace(config, gates=False)).check("check_vq", ("vq",), {})  # the recorded check, not re-measured
    assert "[check_vq] done earlier" in capsys.readouterr().out
