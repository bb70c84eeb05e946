"""Errors the package raises on bad input: each names the offending file and the fix."""

from __future__ import annotations


class CovidXrayError(Exception):
    """Base class: a problem the user can fix, reported without a deep traceback by the CLI."""


class DataError(CovidXrayError):
    """A source folder, metadata file or dataset is missing or malformed."""


class ImageError(CovidXrayError):
    """One image file cannot be used (corrupt, truncated, empty, too large, not an image)."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ModelError(CovidXrayError):
    """A model file or weights file is missing, unreadable or does not fit."""
