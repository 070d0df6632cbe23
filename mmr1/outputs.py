"""What the CLI writes, and where: every file is written whole under a temporary name beside it and renamed into
place, and a generation folder belongs to one run at a time.

A rename replaces whatever has the name, a symbolic link included, and never writes through it; a full disk or a
kill leaves the earlier file (or none), never a partial one. A folder holding files of an earlier run (the names
in RUN_FILES) is refused unless the user asks to overwrite it, and then those files, and only those, are removed
first, so the record beside the images always lists every image there.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

RECORD_FILE = "mmr1_generation.json"
SUBJECT_FILE = "subject.png"  # the visual intermediate, beside the images
PARTIAL_PREFIX = ".mmr1-partial-"  # a file being written; left only by a killed run
# Every name `generate` and `demo` write into their folder: the record, the images, the subject, the demo's
# reference copies, and files a killed run left half written.
RUN_FILES = re.compile(r"mmr1_generation\.json|subject\.png|mmr1_seed\d+\.png|reference-\d+\.png|"
                       + re.escape(PARTIAL_PREFIX) + r".*")


def image_file(seed: int) -> str:
    """The name of the image drawn with `seed`."""
    return f"mmr1_seed{seed}.png"


def reference_file(index: int) -> str:
    """The name of the demo's copy of its reference `index` (0-based)."""
    return f"reference-{index + 1}.png"


def _write_all(file: BinaryIO, data: bytes) -> None:
    file.write(data)


def write_bytes(path: Path, data: bytes) -> None:
    """`data` as `path`, whole or not at all: written to a new file beside it (O_EXCL, no link followed), synced,
    then renamed over `path`, which replaces a link there instead of its target. A failure removes the
    temporary file and raises InputError naming `path`."""
    temporary = path.with_name(f"{PARTIAL_PREFIX}{secrets.token_hex(4)}-{path.name}")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as error:
        raise InputError(f"Cannot write {path}: {error.strerror or error}.") from error
    try:
        with os.fdopen(descriptor, "wb") as file:
            _write_all(file, data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:  # an interrupt too: no partial file stays behind
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise InputError(f"Cannot write {path}: {error.strerror or error}; nothing was left under its name."
                             ) from error
        raise


def write_text(path: Path, text: str) -> None:
    """`text` as UTF-8, written as `write_bytes` writes."""
    write_bytes(path, text.encode("utf-8"))


def _nearest_existing(path: Path) -> Path:
    """`path` or the closest folder above it that exists (a link counts, dangling or not)."""
    return next((candidate for candidate in (path, *path.parents) if os.path.lexists(candidate)), Path("."))


def _check_creatable(path: Path, option: str) -> None:
    """`path` and any missing folder above it can be created: the closest existing one is a writable folder."""
    existing = _nearest_existing(path)
    if existing.is_symlink() and not existing.exists():
        raise InputError(f"Cannot write {option} {path}: {existing} is a dangling symbolic link.")
    if not existing.is_dir():
        raise InputError(f"Cannot write {option} {path}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write {option} {path}: the folder {existing} is not writable.")


def check_output_file(path: Path, option: str = "--out") -> None:
    """Refuse, before any model work, a file output that cannot be written: a folder, a link (dangling or not:
    its target would not be what is written), or under a file, a dangling link or an unwritable folder. Missing
    folders above it are created when it is written."""
    if path.is_symlink():
        raise InputError(f"{option} {path} is a symbolic link{'' if path.exists() else ' to nothing'}; give the path "
                         "of a file (mmr1 replaces files, it never writes through links).")
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give the path of a file to write.")
    _check_creatable(path.parent, option)


def check_output_folder(folder: Path, overwrite: bool, option: str = "--out") -> list[Path]:
    """Refuse, before any model work, a folder that cannot be written (a file, a dangling link, under a file, not
    writable) or that holds files of an earlier run, unless `overwrite`; returns those files, for
    `claim_output_folder` to remove. Other files in the folder are left alone."""
    if folder.is_symlink() and not folder.exists():
        raise InputError(f"{option} {folder} is a dangling symbolic link; give a folder.")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {folder} is a file; give a folder for the images.")
    _check_creatable(folder, option)
    if not folder.is_dir():
        return []
    try:
        earlier = sorted(entry for entry in folder.iterdir() if RUN_FILES.fullmatch(entry.name))
    except OSError as error:
        raise InputError(f"Cannot read {option} {folder}: {error.strerror or error}.") from error
    for entry in earlier:
        if entry.is_dir() and not entry.is_symlink():
            raise InputError(f"{entry} is a folder under a name mmr1 writes; move it out of {option} {folder}.")
    if earlier and not overwrite:
        shown = ", ".join(entry.name for entry in earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3
                                                                  else "")
        raise InputError(f"{option} {folder} holds files of an earlier run ({shown}); give --overwrite to remove "
                         "them first (only mmr1's own files are removed), or another folder.")
    return earlier


def claim_output_folder(folder: Path, earlier: Iterable[Path]) -> None:
    """Create `folder` and remove the earlier run's files (links themselves, never their targets), just before
    the first new file is written: a run that fails before then leaves the earlier one whole."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path in earlier:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    except OSError as error:
        raise InputError(f"Cannot prepare the output folder {folder}: {error}.") from error
