"""Custom socket types of the pack (matched by exact string between nodes)."""

from comfy_api.latest import io

MMR1Model = io.Custom("MMR1_MODEL")
MMR1Subject = io.Custom("MMR1_SUBJECT")
MMR1Reward = io.Custom("MMR1_REWARD")

CATEGORY = "MMR1"
