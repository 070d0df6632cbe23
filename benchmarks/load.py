"""Loading a checkpoint folder: load time against reading its weight files, and peak memory against their size.

    python -m benchmarks.load --shape janus-pro-1b      # writes a random 1B-shaped folder once, then measures
    python -m benchmarks.load --dtype bf16 --load-dtype fp32   # Janus-Pro's bf16 files loaded for a CPU
    python -m benchmarks.load --layout deepseek         # the original DeepSeek layout (pickled pytorch_model.bin)

Each measurement runs in a fresh Python process (peak RSS is per process), on a warm page cache: the file read
runs first, so both contenders read from memory, not from the disk. "RSS over imports" subtracts what the process
held after importing torch and transformers, before it touched the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import gib, machine, table

# Each child prints one JSON line: seconds to load, seconds to load and touch every weight once (transformers 5
# maps safetensors files, so weights are read on first use: "ready" is the honest figure), peak RSS after the
# touch, RSS after imports and the loaded weights' size (bytes).
CHILD = r"""
import json, resource, sys, time
import torch, transformers
from pathlib import Path
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
folder, what, dtype = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
# Module imports are a one-off per process (a ComfyUI server pays them once), not part of loading a folder.
from transformers import JanusForConditionalGeneration, JanusProcessor
import mmr1.loading
mmr1.loading.load_processor(folder)
imported = rss()
started = time.perf_counter()
if what == "read":
    for file in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        with open(file, "rb", buffering=0) as handle:
            buffer = bytearray(1 << 26)
            while handle.readinto(buffer):
                pass
    loaded = ready = time.perf_counter() - started
    resident = 0
elif what == "mmr1":
    from mmr1.loading import load_model
    model = load_model(folder, dtype=dtype, device="cpu").model
else:
    from mmr1.loading import _dtype_kwarg
    model = JanusForConditionalGeneration.from_pretrained(
        folder, local_files_only=True, **{_dtype_kwarg(): {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]})
if what != "read":
    loaded = time.perf_counter() - started
    with torch.no_grad():
        float(sum(parameter.sum() for parameter in model.parameters()))
    ready = time.perf_counter() - started
    resident = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
print(json.dumps({"seconds": loaded, "ready": ready, "peak": rss(), "imported": imported, "resident": resident}))
"""


def measure(folder: Path, what: str, dtype: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), what, dtype], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    if result.returncode:
        raise SystemExit(f"{what} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from mmr1.tiny import SHAPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="janus-pro-1b", choices=tuple(SHAPES))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="dtype on disk")
    parser.add_argument("--load-dtype", default=None, choices=("fp32", "bf16"),
                        help="dtype in memory (default: as on disk)")
    parser.add_argument("--layout", default="hf", choices=("hf", "deepseek"),
                        help="transformers' layout (safetensors) or DeepSeek's original (pickled weights)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="the checkpoint folder (written with random weights when missing; default: under "
                        "the temp folder)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per contender; the fastest counts")
    args = parser.parse_args(argv)

    load_dtype = args.load_dtype or args.dtype
    folder = args.folder or Path(tempfile.gettempdir()) / f"mmr1-bench-{args.shape}-{args.dtype}-{args.layout}"
    if not (folder / "config.json").is_file():
        print(f"writing a random {args.shape} folder ({args.dtype}) to {folder} ...", flush=True)
        subprocess.run([sys.executable, "-m", "mmr1", "make-tiny", str(folder), "--shape", args.shape,
                        "--dtype", args.dtype, "--layout", args.layout],
                       check=True, cwd=Path(__file__).resolve().parent.parent)
    files = sum(file.stat().st_size for file in [*folder.glob("*.safetensors"), *folder.glob("*.bin")])
    contenders = {"read": "read the files", "mmr1": "mmr1 load_model"}
    if args.layout == "hf":  # transformers reads only its own layout
        contenders["transformers"] = "transformers from_pretrained"
    results = {}
    for what in contenders:
        runs = [measure(folder, what, load_dtype) for _ in range(args.repeats)]
        results[what] = min(runs, key=lambda run: run["ready"]) | {"peak": max(run["peak"] for run in runs)}
    print(f"machine: {machine()}")
    print(f"folder: {folder} ({args.shape}, {args.layout} layout, {args.dtype} on disk, loaded as {load_dtype}), "
          f"weight files {gib(files)}")
    read_seconds = results["read"]["ready"]
    rows = []
    for what, name in contenders.items():
        run = results[what]
        over_imports = run["peak"] - run["imported"]
        per_weight = f"{over_imports / run['resident']:.2f}x" if run["resident"] else ""
        rows.append([name, f"{run['seconds']:.2f}", f"{run['ready']:.2f}", f"{run['ready'] / read_seconds:.2f}x",
                     gib(run["peak"]), gib(over_imports), gib(run["resident"]) if run["resident"] else "", per_weight])
    print(table(["contender", "load s", "ready s (every weight read once)", "ready vs read", "peak RSS",
                 "RSS over imports", "weights in memory", "over imports / weights"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
