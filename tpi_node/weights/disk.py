"""A full disk under the shard cache, said in one line: which folder, how much it needs, how much
its file system has free, and what to do.

    check_free(folder, need, "this node's slice (31 files)")   # before writing: DiskFullError
    except OSError as e: raise disk_full(e, folder, need, what) or e   # ENOSPC while writing
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from tpi_node.errors import UserError
from tpi_node.units import format_size

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left / over quota: the same to the user


class DiskFullError(UserError):
    """The shard cache's file system cannot hold what this node must write."""


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _message(folder: Path, need: int, free: int, what: str) -> str:
    return (
        f"disk full: {what} needs {format_size(need)} in {folder}, but its file system has "
        f"{format_size(free)} free; free some space there, or set TPI_HOME to a folder on a larger disk"
    )


def check_free(folder: Path, need: int, what: str) -> None:
    """DiskFullError when `folder`'s file system has less than `need` bytes free."""
    free = free_bytes(folder)
    if free < need:
        raise DiskFullError(_message(folder, need, free, what))


def disk_full(e: OSError, folder: Path, need: int, what: str) -> DiskFullError | None:
    """The DiskFullError an OSError means (no space left, or over quota), else None."""
    if e.errno not in FULL:
        return None
    return DiskFullError(_message(folder, need, free_bytes(folder), what))
