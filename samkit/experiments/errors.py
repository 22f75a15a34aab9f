"""The kinds of failure the ``samkit`` command tells apart.

    UsageError   bad input: an option, a dataset, a run folder that cannot be used as asked. Raised by the
                 checks made before any work; the command prints the message and exits 2.
    OutputError  a result could not be written (disk full, read-only folder): the message names the file and
                 what is safe (the checkpoint's epoch; a result already printed); exit 1, no traceback.
    any other    an internal error (a bug, a numerical failure deep inside): the command lets it through with
                 its traceback (exit 1). A ValueError raised while training is one of these, not bad input.

``checking(...)`` marks a block as "the checks": a ValueError raised inside it (by TrainConfig.resolved, the
dataset readers, the run-folder rules) becomes a UsageError with the same message.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Iterator

# errors of a write that the user can fix (space, permissions, a read-only or failing disk): reported, not traced
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


class UsageError(ValueError):
    """Bad input; the message names the bad value and the fix."""


class OutputError(Exception):
    """A file could not be written; the message says which, why, and what to do next."""


@contextmanager
def checking() -> Iterator[None]:
    """Turn a ValueError raised in the block into a UsageError (the block holds input checks only)."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(str(error)) from error
