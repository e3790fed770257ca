"""Files only the service's own user may read: the home directory and everything in it.

The home holds the ledger (every balance, and prompts until they are
erased), keys, passwords, run records and logs. It is made 0700 and each
file in it 0600 when it is created (an explicit mode, and a umask of 077 in
the processes that write there), and ``secure_home`` tightens what an older
version left readable (0644 files in a 0755 home) when the service starts.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: Mode of the home and of every directory in it.
DIR_MODE = 0o700
#: Mode of every file the service writes in its home.
FILE_MODE = 0o600
#: The umask of processes that write into the home: nothing for group or others.
UMASK = 0o077
#: Bits no file or directory in the home may have.
OPEN_BITS = 0o077


def restrict_umask() -> int:
    """Give this process (and every process it starts) the umask 077; returns the previous one."""
    return os.umask(UMASK)


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents) a directory only its owner can enter; tighten it if it exists."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tighten(path)
    return path


def tighten(path: Path) -> None:
    """Take group and other permissions off ``path`` if it has any (a missing path, or another user's, is left)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode) or not mode & OPEN_BITS:
        return  # a link's own mode means nothing; chmod would follow it out of the home
    try:
        path.chmod(stat.S_IMODE(mode) & ~OPEN_BITS)
    except PermissionError:
        pass  # not ours: nothing this process could do about it


def secure_home(home: Path) -> None:
    """Make the home 0700 and take group and other permissions off everything under it.

    For homes an older version made 0755 with 0644 files: run when the
    service starts, before it opens anything there.
    """
    private_dir(home)
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            tighten(Path(root) / name)


def create_private(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists; True when this call created it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, replacing what was there (tightened first if it was open)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, FILE_MODE)  # an existing file keeps its old mode through O_CREAT
        f.write(data)


def open_private_append(path: Path) -> int:
    """A file descriptor appending to ``path``, created 0600 (an existing one tightened): for logs."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd
