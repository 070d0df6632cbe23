"""Checkpoints the nodes and `python -m mmr1 generate` load directly, written so that a crash never leaves a
partial one where a loader or a resume would find it, and read so that a file planted in one never runs code; and
the run folder that holds them, which one run at a time owns.

A checkpoint is filled in a hidden temporary folder beside its destination and renamed into place; an old one is
renamed to a hidden name before it is deleted. The hidden leftovers of a crash, by their exact names, are removed
by `remove_leftovers`. Before a resume reads an engine state, `check_complete` finds a torn or missing file (the
resume then takes an older checkpoint) and `check_code_free` refuses every file that could run code.

A run writes only into a new or empty folder or one that `MARKER` names a run of the same recipe
(`claim_run_folder`), and holds `LOCK` in it while it runs (`FolderLock`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from pathlib import Path
from pickle import UnpicklingError

import torch

from mmr1.loading import TRAINING_RECORD

from .config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

CODE_FREE_SUFFIXES = (".safetensors", ".json")
MARKER = "mmr1_run.json"  # written at a run's start: the folder is a run of this kit, of the recipe it names
LOCK = "mmr1_run.lock"  # flock'ed by the run writing into the folder; never deleted (see FolderLock)


class RunFolderError(ConfigError):
    """An output_dir a run may not write into: someone else's folder, another recipe's run, or one that a run
    writes into now."""


class CorruptCheckpoint(ConfigError):
    """A checkpoint with a torn or missing file: a resume takes the older one kept beside it."""


def temporary_name(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.tmp")


def publish(temporary: Path, destination: Path) -> Path:
    """Rename a finished `temporary` folder to `destination`, replacing a previous folder whole (one this run's
    folder holds: `claim_run_folder` keeps runs out of folders that are not runs of this kit)."""
    if destination.exists():
        retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, retired)
        os.replace(temporary, destination)
        shutil.rmtree(retired)
    else:
        os.replace(temporary, destination)
    return destination


def retire(folder: Path) -> None:
    """Delete `folder` without it ever existing half-deleted under its own name."""
    hidden = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    os.replace(folder, hidden)
    shutil.rmtree(hidden)


def remove_leftovers(parent: Path, names: str) -> list[Path]:
    """Remove what a killed run left in `parent`: the hidden twins `.NAME.tmp` and `.NAME.old-PID` that
    `temporary_name`, `publish` and `retire` give the names matching the regular expression `names`, and nothing
    else (a hidden folder someone named `.cache.tmp` is theirs). Returns what it removed."""
    pattern = re.compile(rf"\.(?:{names})\.(?:tmp|old-\d+)")
    leftovers = sorted(path for path in parent.glob(".*") if pattern.fullmatch(path.name))
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


def write_training_record(folder: Path, record: dict) -> None:
    (folder / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n",
                                          encoding="utf-8")


def check_code_free(folder: Path) -> None:
    """Refuse `folder` (an engine state) unless every file in it is safetensors, JSON or a torch archive whose
    pickle names only what torch.load(weights_only=True) allows (with the numpy types accelerate adds for its RNG
    states): a resume unpickles the other files (torch's sharded checkpoints and DeepSpeed with
    weights_only=False), and a planted pickle would run its code. Raises ConfigError naming the file."""
    for path in sorted(path for path in folder.rglob("*") if path.is_file()):
        problem = None if path.suffix in CODE_FREE_SUFFIXES else _pickle_problem(path)
        if problem:
            raise ConfigError(
                f"{path} {problem}: a resume would unpickle it, and a pickle can run code, so {folder.parent} is not "
                "resumed (only states of tensors and plain data are). Delete that checkpoint to resume from an older "
                "one, or choose another output_dir."
            )


def _pickle_problem(path: Path) -> str | None:
    """Why unpickling `path` could run code, found without unpickling it (a static scan of its pickle); None if
    it cannot."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    if not zipfile.is_zipfile(path):
        return "is not a torch archive of tensors"
    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (UnpicklingError, ValueError, RuntimeError, EOFError, KeyError) as error:
        return f"is not a plain torch archive ({(str(error) or type(error).__name__).splitlines()[0]})"
    return f"would call {', '.join(sorted(unsafe))} when unpickled" if unsafe else None


# -- what a checkpoint must hold to be resumed --------------------------------------------------------------------


def check_complete(folder: Path) -> None:
    """Raise CorruptCheckpoint naming the file of engine state `folder` that is torn (a crash or a full disk before
    the data reached the disk, a partial copy) or the model or optimizer state it lacks, found from sizes and
    headers before accelerate loads anything: a resume then takes an older checkpoint instead of failing inside
    the load (where processes could fail unalike)."""
    checkpoint = folder.parent
    if not folder.is_dir():
        raise CorruptCheckpoint(f"checkpoint {checkpoint} is corrupt: it has no {folder.name}/")
    names = [path.name for path in folder.iterdir()]
    if not any(name.startswith(("model", "pytorch_model")) for name in names):
        raise CorruptCheckpoint(f"checkpoint {checkpoint} is corrupt: {folder} holds no model state")
    if not any(name.startswith("optimizer") for name in names) and not any(folder.rglob("*optim_states*")):
        raise CorruptCheckpoint(f"checkpoint {checkpoint} is corrupt: {folder} holds no optimizer state")
    for path in sorted(path for path in folder.rglob("*") if path.is_file()):
        problem = _torn(path)
        if problem:
            raise CorruptCheckpoint(f"checkpoint {checkpoint} is corrupt: {path} {problem}")


def _torn(path: Path) -> str | None:
    """Why `path` is not a whole file of its kind; None if it is (or its kind is unknown: `check_code_free`)."""
    if path.stat().st_size == 0:
        return "is empty"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            return f"is not valid JSON ({error})"
        return None
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    with path.open("rb") as file:
        torch_archive = file.read(2) == b"PK"
    # a zip's directory is its end, so a torn torch archive is no zip
    return "is torn (not a complete torch archive)" if torch_archive and not zipfile.is_zipfile(path) else None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, the JSON header, then the tensors' bytes up to the largest
    end offset in the header: any other size is a torn file."""
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if size < 8 + length:
                return f"is torn ({size} bytes, shorter than its header)"
            header = json.loads(file.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        return f"has no readable safetensors header ({error})"
    return None if size == 8 + length + end else f"is torn ({size} bytes, its header describes {8 + length + end})"


# -- the run folder: whose it is, and who writes into it now ------------------------------------------------------


def check_run_folder(output: Path, recipe: str) -> None:
    """Refuse an output_dir that a `recipe` run must not write into: a file, a run of another recipe, or a folder
    with something in it that is not a run of this kit (a run replaces final/, starts metrics.jsonl over and
    removes its own leftovers there). A new folder, an empty one (but for what a run killed while claiming it
    left: the lock file, a temporary marker) and a run of `recipe` pass; so does a run folder of an earlier version
    of this kit (checkpoints, but no marker yet)."""
    if not output.exists():
        return
    if not output.is_dir():
        raise RunFolderError(f"output_dir {output} is a file; choose a folder for output_dir.")
    marker = output / MARKER
    if marker.exists():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))["recipe"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunFolderError(f"cannot read {marker} ({error}), so output_dir {output} is not known to be a run "
                                 "of this kit; choose another output_dir.") from error
    else:
        saved = _unmarked_run_recipe(output)
    if saved is not None and saved != recipe:
        raise RunFolderError(f"output_dir {output} holds a run of recipe {saved!r}; a {recipe} run needs a folder of "
                             "its own: choose another output_dir.")
    if saved is None and any(path.name not in (LOCK, f".{MARKER}.tmp") for path in output.iterdir()):
        raise RunFolderError(f"output_dir {output} is not empty and is not a run folder of this kit (it has no "
                             f"{MARKER}); a run would replace final/ and metrics.jsonl in it. Choose a new or empty "
                             f"folder as output_dir, or move what {output} holds elsewhere.")


def _unmarked_run_recipe(output: Path) -> str | None:
    """The recipe of a run folder written before runs had a marker, from a checkpoint's trainer state."""
    for path in sorted((output / "checkpoints").glob("step-*/trainer_state.json")):
        try:
            return str(json.loads(path.read_text(encoding="utf-8"))["recipe"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def claim_run_folder(output: Path, recipe: str) -> FolderLock:
    """Make `output` this `recipe` run's folder: checked, locked, checked again under the lock (a run that got in
    between), and marked. The caller releases the returned lock when the run ends."""
    check_run_folder(output, recipe)
    output.mkdir(parents=True, exist_ok=True)
    lock = FolderLock.take(output)
    try:
        check_run_folder(output, recipe)
        marker = output / MARKER
        if not marker.exists():
            temporary = marker.with_name(f".{MARKER}.tmp")
            temporary.write_text(json.dumps({"kit": "ComfyUI-MMR1 training", "recipe": recipe}, indent=2) + "\n",
                                 encoding="utf-8")
            os.replace(temporary, marker)
    except BaseException:
        lock.release()
        raise
    return lock


class FolderLock:
    """An exclusive flock on `output/LOCK`, held while a run writes into `output`; the file records who holds it
    (pid, host, start), for the error a second run gets.

    flock rather than a file created with O_EXCL: the kernel releases it when its holder dies, kill -9 included,
    so a killed run's lock needs no stale-lock guessing (pid alive? same host? pid reused?) and the next run just
    takes it. flock rather than fcntl/lockf record locks: those belong to the process, so a second run in the same
    process would pass and closing any descriptor of the file would drop them. The file itself is never deleted: a
    run deleting it could leave two runs each holding a lock, on the old file and on a new one."""

    def __init__(self, path: Path, file):
        self.path, self._file = path, file

    @classmethod
    def take(cls, output: Path) -> FolderLock:
        """Lock `output`, or raise RunFolderError naming the run that holds it."""
        path = output / LOCK
        file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
        if fcntl is None:
            print(f"warning: this platform has no flock, so {output} is not locked; run one run at a time in it",
                  file=sys.stderr)
            return cls(path, file)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            file.close()
            raise RunFolderError(f"output_dir {output} is in use by another run: {path} is held by {holder}. Wait for "
                                 "that run to end or stop it, or choose another output_dir.") from None
        except OSError as error:  # a file system without locks
            print(f"warning: cannot lock {path} ({error}); run one run at a time in {output}", file=sys.stderr)
            return cls(path, file)
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}) + "\n")
        file.flush()
        return cls(path, file)

    def release(self) -> None:
        """Unlock (closing the file unlocks it); the file stays, emptied."""
        if self._file is not None:
            self._file.truncate(0)
            self._file.close()
            self._file = None


def _holder(path: Path) -> str:
    """Who holds the lock at `path`, as its file says (it may not have written it yet)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']} (started {holder['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that has not written its pid yet"
