"""Errors the package raises on bad input: each names the offending file and the fix."""

from __future__ import annotations

import errno


class CovidXrayError(Exception):
    """Base class: a problem the user can fix, reported without a deep traceback by the CLI.

    ``usage=True`` marks a usage error: the command itself is wrong (a setting's value, settings that cannot go
    together, a missing one) and the fix is to change it. The command line exits 2 for a usage error and 1 for
    every other problem (the work failed: a missing or unreadable input, a refused output folder).
    """

    usage: bool = False
    """True for a usage error (the command line's exit status 2)."""

    def __init__(self, *args: object, usage: bool = False) -> None:
        super().__init__(*args)
        if usage:
            self.usage = True


class UsageError(CovidXrayError):
    """The command line itself is wrong where no more specific type fits: always a usage error."""

    usage = True


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


class ClusterError(CovidXrayError):
    """The other machines of a multi-worker run cannot all be reached within the start-up timeout."""


_OS_FIXES: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free some space or choose another {out} on a disk with room",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another {out}",
    errno.EROFS: "the file system is read-only: choose a writable {out}",
    errno.EACCES: "permission denied: choose a writable {out}, or fix the permissions of that path",
    errno.EPERM: "operation not permitted: choose a writable {out}, or fix the permissions of that path",
    errno.EBUSY: "a mount point or the working directory cannot be replaced: choose a subfolder as {out}",
    errno.ENOTDIR: "a file stands where a folder is needed: remove it or choose another {out}",
    errno.EISDIR: "a folder stands where a file is needed: choose another path",
    errno.ENOENT: "the path does not exist: check it",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def os_error_line(exc: OSError, out_flag: str = "--out") -> str:
    """``<path>: <strerror> (<errno name>); <fix>`` for an OS error, the fix naming the verb's output flag."""
    name = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno is not None else type(exc).__name__
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    text = exc.strerror or str(exc)
    fix = _OS_FIXES.get(exc.errno, "check the path and try again").format(out=out_flag)
    return f"{where + ': ' if where else ''}{text} ({name}); {fix}"
