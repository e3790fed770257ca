"""Make a process die with its parent (Linux ``PR_SET_PDEATHSIG``).

A parent killed with SIGKILL runs no clean-up, so its children live on as
orphans: components of ``llamas up`` keep their ports, and an embedded beat
keeps sending ticks beside a restarted herder's. Asking the kernel for a
signal when the parent dies closes that gap.

The flag is per process and cleared by ``fork``, so every level sets its own:
``llamas up`` for its components (between fork and exec; it survives exec),
and the Celery main process's embedded beat through ``connect_celery_signals``.
Prefork pool children need nothing from us: Celery (5.3 and later) gives
them SIGKILL on their parent's death itself.

Why our own ctypes call: we need one stable syscall. ``pyprctl`` (last
released 2021) refuses to import on machines outside its hand-written syscall
table (e.g. loongarch64, mips), for calls we do not use; billiard's
``set_pdeathsig`` (what Celery uses) loads ``libc.so.6`` by that name on
every call — absent on musl, and a library load after fork in a preexec
hook — and ignores prctl's result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from typing import Any

from celery.signals import beat_embedded_init, worker_init

#: prctl(2) option number from <linux/prctl.h>; part of the stable kernel ABI.
PR_SET_PDEATHSIG = 1
#: Why a parent-death signal cannot be had here, or None where it can.
UNSUPPORTED = None if sys.platform.startswith("linux") else (
    f"{sys.platform} has no PR_SET_PDEATHSIG; children are stopped through their process group instead"
)

_prctl: Any = None
#: pid of the Celery main process, recorded before it forks its beat.
_celery_main_pid: int | None = None


def _load_prctl() -> Any:
    """libc's prctl, resolved once (before any fork: a preexec hook must not load libraries)."""
    global _prctl
    if _prctl is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _prctl = libc.prctl
        _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _prctl.restype = ctypes.c_int
    return _prctl


def prepare() -> bool:
    """Resolve prctl in the parent; False (and nothing to do) where unsupported."""
    if UNSUPPORTED is not None:
        return False
    _load_prctl()
    return True


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> bool:
    """Ask for ``sig`` when this process's parent dies; False where unsupported.

    ``parent_pid`` closes the race of a parent that died before the request
    took effect: when this process has already been re-parented, it sends
    itself ``sig`` at once.
    """
    if UNSUPPORTED is not None:
        return False
    if _load_prctl()(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
    return True


def _remember_main(**_: Any) -> None:
    global _celery_main_pid
    _celery_main_pid = os.getpid()
    prepare()


def _beat_of_main(**_: Any) -> None:
    # The signal follows the *thread* that forked us; a beat forked by any
    # thread but the main one would die when that thread ends. After fork the
    # forking thread is this process's only thread and keeps its name.
    if threading.current_thread().name != "MainThread":
        return
    # SIGKILL, as Celery gives its pool children: the worker that would stop
    # this beat is gone, and beat resets SIGTERM to its default anyway.
    die_with_parent(signal.SIGKILL, _celery_main_pid)


def connect_celery_signals() -> None:
    """Make the embedded beat (``worker -B``) die with its worker's main process.

    Idempotent: Celery keeps one connection per receiver. ``beat_embedded_init``
    and not ``beat_init``: a standalone ``celery beat`` must outlive the shell
    that started it.
    """
    worker_init.connect(_remember_main, weak=False)
    beat_embedded_init.connect(_beat_of_main, weak=False)
