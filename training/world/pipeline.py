"""The embedded model, end to end: train every part of a tiny Janus on the procedural subject world.

    python -m training.world.pipeline [--install] [--output_dir runs/world] [--config FILE] [--key value ...]

Without --config it runs the values of training/world/configs/pipeline.toml. The SFT and GRPO recipes it runs
(`sft_config`, `grpo_config`) are read and checked before the first stage, so a bad key fails in seconds; a
relative name is a file of training/world/configs/ when there is one, so the command runs from any folder.

Stages, each written under `output_dir` and skipped when already complete (a killed run picks up where it
stopped; SFT and GRPO also resume inside their stage):

1. `components/`: the VQ tokenizer and the understanding encoder (vq.py, understanding.py);
2. `judge/`: the evaluation-only attribute classifier (judge.py);
3. `check_vq/`: the stage diagnosis of the VQ (the judge on its reconstructions of held-out renders, flat colours);
4. `reward/`: the CLIP-style reward model (clip_reward.py);
5. `base/`: a Janus folder (transformers classes, world tokenizer) holding the trained VQ and encoder;
6. `data/`: SFT records (with targets and reasoning) and GRPO prompt records, from training subjects only;
7. `sft/`, then `check_sft/`: the SFT recipe of configs/sft.toml, then its diagnosis (grounding per attribute,
   images from the true reasoning);
8. `grpo/`: the GRPO recipe of configs/grpo.toml;
9. `eval/`: `python -m training.world.evaluate` on the held-out subjects, every stage and the conditions (a)-(d).

With `gates` on, a check whose bars (training/world/diagnosis.py) are missed stops the pipeline with the numbers,
so a VQ that erases the subject never costs an hour of SFT; its report stays in the check's folder, and running
again with `--gates false` goes on from there.

`--install` copies the GRPO model, the reward model and the judge into `mmr1/assets/`, where
`python -m mmr1 demo` and the Load MMR1 Model node find them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from mmr1.embedded import ASSETS_DIR, JUDGE_NAME, MODEL_NAME, REWARD_NAME
from mmr1.errors import InputError
from mmr1.prompting import GROUNDING_INSTRUCTION
from mmr1.tiny import TOKENIZER_CORPUS, TinySpec

from ..config import ConfigError, build_config, knob, read_toml, recipe_main
from .recipes import CONFIGS
from .scenes import TRAIN_SUBJECTS, labelled_scenes, sample_example, subject_renders, write_dataset

WORLD_SPEC = TinySpec(
    hidden_size=192,
    intermediate_size=512,
    num_layers=4,
    num_heads=6,
    # two references (64 slots each), the subject and the image (64 tokens each), and room for long prompts and
    # reasoning: rotary positions, so the number costs no weights
    max_positions=1024,
    tokenizer_vocab_size=768,
    vision_hidden_size=96,
    vision_layers=3,
    vision_heads=4,
    image_size=32,
    patch_size=4,  # transformers ties the VQ's token grid to the vision patch grid: 8x8 tokens of 4x4 pixels
    vq_codebook_size=1024,
    vq_embed_dim=8,
    vq_base_channels=32,
    vq_channel_multiplier=(1, 2, 2),
    vq_latent_channels=32,
    initializer_range=0.02,
)
DONE = "stage.json"


@dataclass(frozen=True)
class PipelineConfig:
    output_dir: Path = knob(Path("runs/world"), "every stage's output goes under this folder")
    seed: int = knob(0, "seed of every stage")
    scenes: int = knob(40000, "rendered training scenes for the VQ, encoder, judge and reward model (the encoder "
                              "reads held-out shapes at 60 % from 6,000 of them, at 97 % from 40,000)")
    vq_steps: int = knob(6000, "VQ tokenizer steps (batches of 16)")
    vq_full_steps: int = knob(3000, "of which the last ones see whole images instead of 16x16 crops")
    vq_learning_rate: float = knob(1e-3, "VQ tokenizer peak learning rate")
    vq_decoder_steps: int = knob(400, "then decoder-only steps with every world colour as a flat field in each batch "
                                      "(the tokens stay; flat colours come back within a few levels, not 30)")
    vq_base_channels: int = knob(WORLD_SPEC.vq_base_channels, "VQ channels at full resolution before the multipliers "
                                 "(a multiple of 32: transformers' VQ normalises in 32 groups)")
    vq_channel_multiplier: tuple[int, ...] = knob(WORLD_SPEC.vq_channel_multiplier, "VQ channel multiplier per "
                                                  "level (3 levels: 32x32 images to the 8x8 token grid)")
    vq_codebook_size: int = knob(WORLD_SPEC.vq_codebook_size, "VQ codebook entries (image vocabulary)")
    understanding_steps: int = knob(5000, "understanding encoder steps (batches of 64)")
    judge_steps: int = knob(2500, "judge steps (batches of 64)")
    reward_steps: int = knob(600, "reward model steps (batches of 64)")
    sft_records: int = knob(24000, "SFT records (training subjects, two references each): about 5 passes of "
                                   "the SFT steps; 8,000, seen 16 times, were memorised")
    grpo_records: int = knob(400, "GRPO prompt records (training subjects)")
    sft_config: Path = knob(Path("sft.toml"), "SFT recipe (a file of training/world/configs/ by name, else a path); "
                                              "model, data and output_dir are set by the pipeline")
    grpo_config: Path = knob(Path("grpo.toml"), "GRPO recipe (found as sft_config is); model, data and output_dir "
                                                "are set by the pipeline, {reward} in rewards is its reward model")
    evaluate: bool = knob(True, "run python -m training.world.evaluate on the held-out subjects at the end")
    eval_tasks: int = knob(200, "held-out tasks (subject, references, target scene) every check and the evaluation draw")
    gates: bool = knob(True, "stop after a check (check_vq, check_sft) whose diagnosis misses a bar")

    def __post_init__(self) -> None:
        for name in ("scenes", "vq_steps", "understanding_steps", "judge_steps", "reward_steps", "sft_records",
                     "grpo_records", "eval_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"config key {name!r} must be at least 1")
        if not 0 <= self.vq_full_steps <= self.vq_steps:
            raise ValueError("config key 'vq_full_steps' must be between 0 and vq_steps")
        if self.vq_base_channels < 32 or self.vq_base_channels % 32:
            raise ValueError("config key 'vq_base_channels' must be a positive multiple of 32")
        if len(self.vq_channel_multiplier) != len(WORLD_SPEC.vq_channel_multiplier) or min(self.vq_channel_multiplier) < 1:
            raise ValueError(f"config key 'vq_channel_multiplier' needs {len(WORLD_SPEC.vq_channel_multiplier)} "
                             "positive levels (the token grid is 8x8 for 32x32 images, the vision patch grid)")
        if self.vq_codebook_size < 2:
            raise ValueError("config key 'vq_codebook_size' must be at least 2")

    @property
    def spec(self) -> TinySpec:
        """The world Janus's sizes, with this config's VQ."""
        return replace(WORLD_SPEC, vq_base_channels=self.vq_base_channels, vq_codebook_size=self.vq_codebook_size,
                       vq_channel_multiplier=tuple(self.vq_channel_multiplier))


def world_corpus() -> str:
    """Tokenizer training text: the chat template, the grounding instruction and world prompts and reasoning."""
    examples = [sample_example(TRAIN_SUBJECTS, seed) for seed in range(300)]
    lines = [TOKENIZER_CORPUS, GROUNDING_INSTRUCTION] + [f"{e.prompt}\n{e.reasoning()}" for e in examples]
    return "\n".join(lines)


def recipe_file(name: Path) -> Path:
    """A recipe the pipeline config names: the file of training/world/configs/ by that name, else the path as given."""
    for candidate in (CONFIGS / name, Path(name)):  # CONFIGS / an absolute path is that path
        if candidate.is_file():
            return candidate
    raise ConfigError(f"recipe {name} is neither a file of {CONFIGS} nor a file from {Path.cwd()}")


class PipelineStopped(ConfigError):
    """A stage's diagnosis missed its bars while `gates` is on."""


class Pipeline:
    """Runs the stages in order; a stage whose folder holds `stage.json` is done and skipped."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.out = config.output_dir
        # read and checked before any stage runs: a bad recipe key fails now, not after an hour of stages
        self.sft_recipe, self.grpo_recipe = self.recipes()

    def recipes(self):
        """(SFTConfig, GRPOConfig) that the sft and grpo stages run: their TOML files with the pipeline's paths."""
        from ..grpo import GRPOConfig
        from ..rewards import parse_spec
        from ..sft import SFTConfig

        sft = self._recipe(SFTConfig, self.config.sft_config, model=self.out / "base",
                           data=self.out / "data" / "sft" / "records.jsonl", output_dir=self.out / "sft")
        grpo = self._recipe(GRPOConfig, self.config.grpo_config, model=self.out / "sft" / "final",
                            data=self.out / "data" / "grpo" / "records.jsonl", output_dir=self.out / "grpo")
        reward = self.out / "reward"
        grpo = replace(grpo, rewards=tuple(spec.replace("{reward}", str(reward)) for spec in grpo.rewards))
        if sft.subject_source != grpo.subject_source:
            raise ConfigError(f"{recipe_file(self.config.grpo_config)}: subject_source {grpo.subject_source!r} differs "
                              f"from the SFT recipe's {sft.subject_source!r}; GRPO optimises the chain SFT taught.")
        for spec in grpo.rewards:  # the syntax only: the reward folder exists once its stage has run
            try:
                parse_spec(spec)
            except InputError as error:
                raise ConfigError(f"{recipe_file(self.config.grpo_config)}: {error}") from error
        return sft, grpo

    def stage(self, name: str, work) -> Path:
        folder = self.out / name
        if (folder / DONE).is_file():
            print(f"[{name}] done earlier: {folder}")
            return folder
        started = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        record = work(folder) or {}
        record["seconds"] = round(time.perf_counter() - started, 1)
        (folder / DONE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"[{name}] {record}", flush=True)
        return folder

    @cached_property
    def scenes(self):
        return labelled_scenes(self.config.scenes, self.config.seed, "train")

    @cached_property
    def subjects_alone(self):
        """(images, labels) of every training subject alone: in the VQ's data and the judge's."""
        return subject_renders(TRAIN_SUBJECTS)

    def components(self, folder: Path) -> dict:
        from safetensors.torch import save_file

        from .understanding import train_understanding_encoder
        from .vq import polish_decoder, reconstruction_error, train_vq, training_images

        folder.mkdir(parents=True, exist_ok=True)
        held_out = labelled_scenes(256, self.config.seed + 1, "heldout")
        images = training_images(self.scenes.images, self.subjects_alone[0], self.config.seed)
        vq, vq_losses = train_vq(self.config.spec, images, self.config.vq_steps, self.config.vq_full_steps,
                                 batch_size=16, learning_rate=self.config.vq_learning_rate, seed=self.config.seed)
        decoder_losses = polish_decoder(vq, images, self.config.vq_decoder_steps, seed=self.config.seed)
        save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(folder / "vq.safetensors"))
        encoder, encoder_losses = train_understanding_encoder(
            self.config.spec, self.scenes.images, self.scenes.labels(), self.config.understanding_steps, seed=self.config.seed)
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / "understanding.safetensors"))
        return {"vq_loss_last": vq_losses[-1], "vq_decoder_loss_last": decoder_losses[-1] if decoder_losses else None,
                "vq_heldout_mean_abs_error": reconstruction_error(vq, held_out.images),
                "understanding_loss_last": encoder_losses[-1]}

    def judge(self, folder: Path) -> dict:
        from .judge import attribute_accuracy, save_judge, train_judge

        judge, losses = train_judge(self.scenes.images, self.scenes.labels(), self.config.judge_steps,
                                    seed=self.config.seed, subjects_alone=self.subjects_alone)
        held_out = labelled_scenes(512, self.config.seed + 2, "heldout")
        rendered = torch.as_tensor(held_out.images).float() / 255
        record = {"loss_last": losses[-1], "heldout_renders": attribute_accuracy(judge, rendered, held_out.truths())}
        save_judge(judge, folder, {"trained_on": "training/world/scenes.py renders (training subjects)", **record})
        return record

    def check(self, name: str, stages: tuple[str, ...], models: dict[str, Path], vq=None) -> None:
        """A diagnosis stage (training/world/evaluate.py's `stages`); with `gates`, missed bars stop the run."""
        from .evaluate import evaluate_world

        folder = self.stage(name, lambda out: evaluate_world(
            models, None, self.out / "judge", self.config.eval_tasks, self.config.seed, out, stages=stages,
            vq=vq() if vq else None, subject_source=self.sft_recipe.subject_source))
        failed = json.loads((folder / DONE).read_text(encoding="utf-8"))["failed"]
        if failed and self.config.gates:
            raise PipelineStopped(
                f"[{name}] the diagnosis misses its bars, so the next stages would train on a broken stage:\n  "
                + "\n  ".join(failed) + f"\nreport: {folder / 'report.md'}; run again with --gates false to go on.")

    def _trained_vq(self):
        from safetensors.torch import load_file
        from transformers.models.janus.modeling_janus import JanusVQVAE

        from mmr1.tiny import build_vq_config

        vq = JanusVQVAE(build_vq_config(self.config.spec))
        vq.load_state_dict(load_file(str(self.out / "components" / "vq.safetensors")))
        return vq.eval()

    def reward(self, folder: Path) -> dict:
        from .clip_reward import train_clip_reward

        losses = train_clip_reward(folder, self.scenes, self.config.reward_steps, seed=self.config.seed)
        return {"loss_first": losses[0], "loss_last": losses[-1]}

    def base(self, folder: Path) -> dict:
        """The Janus folder SFT starts from: random language model, trained VQ and understanding encoder."""
        from safetensors.torch import load_file
        from transformers import JanusForConditionalGeneration

        from mmr1.tiny import make_tiny_checkpoint

        make_tiny_checkpoint(folder, spec=self.config.spec, seed=self.config.seed, corpus=world_corpus())
        model = JanusForConditionalGeneration.from_pretrained(folder)
        model.model.vqmodel.load_state_dict(load_file(str(self.out / "components" / "vq.safetensors")))
        model.model.vision_model.load_state_dict(load_file(str(self.out / "components" / "understanding.safetensors")))
        model.save_pretrained(folder, safe_serialization=True)
        return {"parameters": sum(p.numel() for p in model.parameters())}

    def data(self, folder: Path) -> dict:
        sft = write_dataset(folder / "sft", "train", self.config.sft_records, 2, self.config.seed)
        grpo = write_dataset(folder / "grpo", "train", self.config.grpo_records, 2, self.config.seed + 1,
                             with_target=False)
        return {"sft": str(sft), "grpo": str(grpo)}

    def sft(self, folder: Path) -> dict:
        from ..sft import train

        return {"final": str(train(self.sft_recipe))}

    def grpo(self, folder: Path) -> dict:
        from ..grpo import train

        return {"final": str(train(self.grpo_recipe))}

    def evaluation(self, folder: Path) -> dict:
        from .evaluate import evaluate_world

        report = evaluate_world(
            models={"sft": self.out / "sft" / "final", "grpo": self.out / "grpo" / "final"},
            reward=self.out / "reward", judge=self.out / "judge", tasks=self.config.eval_tasks,
            seed=self.config.seed, out_dir=folder, subject_source=self.grpo_recipe.subject_source)
        return report

    @staticmethod
    def _recipe(cls, name: Path, **paths):
        path = recipe_file(name)
        return build_config(cls, {**read_toml(path), **paths}, str(path))

    def run(self) -> Path:
        torch.manual_seed(self.config.seed)
        self.stage("components", self.components)
        self.stage("judge", self.judge)
        self.check("check_vq", ("vq",), {}, vq=self._trained_vq)
        self.stage("reward", self.reward)
        self.stage("base", self.base)
        self.stage("data", self.data)
        self.stage("sft", self.sft)
        self.check("check_sft", ("sft",), {"sft": self.out / "sft" / "final"})
        self.stage("grpo", self.grpo)
        if self.config.evaluate:
            self.stage("eval", self.evaluation)
        return self.out


DEMO_TASK_SEED = 7  # held-out task of the bundled demo (a subject training never showed)


def demo_task():
    """The held-out task whose references and prompt `install` bundles for `python -m mmr1 demo`."""
    from .evaluate import held_out_tasks

    return held_out_tasks(DEMO_TASK_SEED + 1, seed=0)[DEMO_TASK_SEED]


def shipped_stage(out: Path) -> str:
    """'grpo', unless the run's evaluation measured X-CoT after GRPO below X-CoT after SFT on the held-out subjects
    (then 'sft'): the package ships whichever model draws the subject better."""
    report = out / "eval" / "report.json"
    if not report.is_file():
        return "grpo"
    subject = {measure["measure"]: measure["subject"]["mean"]
               for measure in json.loads(report.read_text(encoding="utf-8"))["measures"]}
    after_sft, after_grpo = subject.get("(c) X-CoT"), subject.get("(d) X-CoT after GRPO")
    return "sft" if after_sft is not None and after_grpo is not None and after_grpo < after_sft else "grpo"


def install(out: Path, target: Path = ASSETS_DIR) -> Path:
    """Copy the better final model (`shipped_stage`), the reward model and the judge of a pipeline run into the
    package, with the demo task."""
    stage = shipped_stage(out)
    print(f"[install] {MODEL_NAME} <- {out / stage / 'final'} (X-CoT measured best after {stage.upper()})")
    sources = {MODEL_NAME: out / stage / "final", REWARD_NAME: out / "reward", JUDGE_NAME: out / "judge"}
    for source in sources.values():
        if not source.is_dir():
            raise ConfigError(f"{source} is missing; run the pipeline to the end before --install.")
    for name, source in sources.items():
        destination = target / name
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(source, destination, ignore=shutil.ignore_patterns(DONE))
    task = demo_task()
    demo = target / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    names = []
    for index, image in enumerate(task.references()):
        names.append(f"reference-{index + 1}.png")
        image.save(demo / names[-1])
    (demo / "demo.json").write_text(json.dumps({
        "references": names, "prompt": task.prompt, "subject": task.subject.description(),
        "note": "a held-out subject of training/world/scenes.py: the embedded model never saw it in training",
    }, indent=2) + "\n", encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--install", action="store_true")
    known, rest = parser.parse_known_args(argv if argv is not None else sys.argv[1:])

    def train(config: PipelineConfig) -> Path:
        out = Pipeline(config).run()
        return install(out) if known.install else out

    return recipe_main(PipelineConfig, __doc__.split("\n\n")[0] + " (--install copies the result into mmr1/assets)",
                       train, rest)


if __name__ == "__main__":
    raise SystemExit(main())
