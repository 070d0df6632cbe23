"""The embedded world model: a procedural subject world and everything that trains and measures a tiny Janus on it.

- `scenes`: subjects, scenes, renders, tasks and datasets (`python -m training.world.scenes dataset ...`);
- `vq`, `understanding`, `judge`, `clip_reward`: the component trainers, on `fit`'s shared loop;
- `pipeline`: every stage in one command (`python -m training.world.pipeline [--install]`);
- `diagnosis`: per-stage measures on held-out tasks, bootstrap intervals and the bars each stage must reach;
- `evaluate`: the stage diagnosis report (`python -m training.world.evaluate`), which the pipeline also runs as
  checks after the VQ and after SFT;
- `recipes`: the templates of `configs/` (`python -m training.world.recipes` rewrites them).

It builds on the general kit (training.config, data, sft, grpo, dreambench); the kit never imports it.
"""
