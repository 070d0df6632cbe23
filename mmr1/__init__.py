"""mmr1: zero-shot personalized image generation with unified multimodal LLMs (Janus-Pro), after MM-R1.

Importing this package is cheap (no torch or transformers): front ends such as the ComfyUI nodes import the
submodules they need when they run. Entry points: `mmr1.loading.load_model`, `mmr1.xcot.ground`,
`mmr1.generation.generate`, `mmr1.rewards`, and `python -m mmr1`.
"""

__version__ = "0.1.0"
