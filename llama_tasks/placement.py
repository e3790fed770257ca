"""Where a worker process runs its engine: on one GPU, or on the CPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """How one worker process loads its model."""

    gpu: int | None
    n_gpu_layers: int
    n_threads: int

    @property
    def cuda_visible_devices(self) -> str | None:
        return None if self.gpu is None else str(self.gpu)


def place(gpu: int | None, threads: int) -> Placement:
    """On ``gpu`` with every layer offloaded, or on the CPU; ``threads`` for llama.cpp's own work.

    A process serves one GPU (``llamas up`` starts one per GPU), so there is
    nothing to share out here; the threads are still needed on a GPU for
    sampling and what stays on the CPU.
    """
    if gpu is not None and gpu < 0:
        raise ValueError(f"a GPU id is >= 0, got {gpu}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if gpu is not None:
        return Placement(gpu=gpu, n_gpu_layers=-1, n_threads=threads)
    return Placement(gpu=None, n_gpu_layers=0, n_threads=threads)
