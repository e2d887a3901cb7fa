"""Errors that are the user's to fix: the CLI prints them as lines, never a traceback."""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """A mistake in what the user asked for (spec, paths, names).

    ``problems`` is a list of one-line messages, each naming the field or file at fault.
    """

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))

    #: The CLI's exit code: 2, what was asked for is wrong.
    exit_code = 2


class StorageError(UserError):
    """The file system refused one of vlprompt's own files (a full disk, a folder that
    cannot be written, a file or folder in the way): the user's to fix, but nothing
    asked for was wrong, so the CLI exits with code 1 (the run failed). Each problem
    names the file and what to do."""

    exit_code = 1


#: What to do when the file system refuses a file, by ``errno``.
_FIXES = {
    errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space within your quota",
    errno.EFBIG: "free space on that disk", errno.EROFS: "make it writable", errno.EACCES: "make it writable",
    errno.EPERM: "make it writable", errno.EISDIR: "a folder is in the way: move it away",
    errno.ENOTDIR: "a file is in the way of a folder: move it away",
    errno.EEXIST: "a file is in the way of a folder: move it away",
    errno.ENOENT: "it went away while in use: check the folder is there",
}


def os_error(exc: BaseException, path: str | os.PathLike | None = None) -> OSError | None:
    """``exc`` as an :class:`OSError` naming the file it is about: ``path`` when it
    names none, the target rather than the temporary file of a rename. An OSError, or
    another library's error that carries one (safetensors: ``... (os error 28)``);
    None when ``exc`` is not about the file system."""
    if isinstance(exc, OSError):
        code, text, name = exc.errno, exc.strerror, exc.filename2 or exc.filename
    else:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            return None
        code = int(found.group(1))
        text, name = os.strerror(code), None
    return OSError(code, text or str(exc), str(name if name is not None else path))


def storage_problem(exc: OSError, elsewhere: str | None = None) -> str:
    """One line for a file the file system refused: the file, why, and what to do
    (``elsewhere``: how to go somewhere else instead, e.g. another output folder)."""
    name = exc.filename if exc.filename is not None else "a file"
    fix = _FIXES.get(exc.errno, "fix that")
    return f"{name}: {exc.strerror or exc}; {fix}" + (f", or {elsewhere}" if elsewhere else "")
