"""One exception hierarchy for the toolkit. Every message names the problem and the remedy.

The CLI maps each class to its own exit code and prints only the message (no traceback).
"""

from __future__ import annotations


class AceStepError(Exception):
    """Base class: ``str(err)`` is the user-facing message, ``exit_code`` the CLI status."""

    exit_code = 1

    def __init__(self, problem: str, remedy: str | None = None):
        self.problem = problem
        self.remedy = remedy
        super().__init__(problem if not remedy else f"{problem} Fix: {remedy}")


class InputError(AceStepError, ValueError):
    """Bad user input (prompt, duration, steps, shift, latents, output path...)."""

    exit_code = 2


class ArtifactError(AceStepError):
    """An artifact directory is missing, incomplete, corrupted or of another format version."""

    exit_code = 3


class CheckpointError(AceStepError):
    """A model directory is not a diffusers-format ACE-Step 1.5 checkpoint."""

    exit_code = 4


class ExportValidationError(AceStepError):
    """An exported graph differs from PyTorch beyond its tolerance."""

    exit_code = 5


class BackendError(AceStepError):
    """The requested backend or device is not available on this machine."""

    exit_code = 6
