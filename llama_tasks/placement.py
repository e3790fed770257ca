"""Where a prefork child runs: one GPU by its child index, or a share of the cores."""

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


def place(child_index: int, gpus: list[int], concurrency: int, cpus: int) -> Placement:
    """Pin child ``child_index`` to a GPU, or split ``cpus`` among the children.

    With GPUs, child *i* takes ``gpus[i % len(gpus)]`` (more children than GPUs
    share them round-robin) and offloads every layer; the CPU threads it still
    needs for sampling are a share of the cores. Without GPUs, each child gets
    ``cpus // concurrency`` threads (at least one) so children do not fight.
    """
    if child_index < 0:
        raise ValueError(f"child index must be >= 0, got {child_index}")
    n_threads = max(1, cpus // max(1, concurrency))
    if gpus:
        return Placement(gpu=gpus[child_index % len(gpus)], n_gpu_layers=-1, n_threads=n_threads)
    return Placement(gpu=None, n_gpu_layers=0, n_threads=n_threads)
