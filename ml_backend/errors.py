"""User-facing errors.

Every error a user can cause (a bad file, a wrong option, a server that is down) is raised as a
:class:`MadsegError` whose message names the input and says what to do. The ``madseg`` CLI prints
such errors as one line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class MadsegError(Exception):
    """An error caused by input or environment, with a message meant for the user."""


class ImageReadError(MadsegError):
    """An image file could not be read as an image."""


class MaskError(MadsegError):
    """A mask file is unreadable or has values outside 0..C-1 and the ignore index."""


class ModelError(MadsegError):
    """A model cannot be built or loaded (unknown name, mismatching checkpoint, bad file)."""
