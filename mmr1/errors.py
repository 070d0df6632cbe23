"""Exceptions that carry a message a user can act on.

Every failure that a user can cause (a wrong folder, a bad image, a setting out of range) raises one of these,
so front ends (CLI, ComfyUI nodes) can show the message as is instead of a traceback.
"""

import sys
from collections.abc import Callable


class MMR1Error(Exception):
    """Base class for errors that mmr1 explains to the user."""


class ModelFolderError(MMR1Error):
    """A model or reward folder is missing, incomplete, corrupt or of another architecture."""


class InputError(MMR1Error, ValueError):
    """An image, mask, prompt or setting that cannot be used as given."""


class GenerationCancelled(MMR1Error):
    """The caller's cancel check asked to stop between two tokens."""


def report_user_errors(command: Callable[[], int]) -> int:
    """Run a command-line entry point: an MMR1Error becomes one `error:` line on stderr and exit status 2."""
    try:
        return command()
    except MMR1Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
