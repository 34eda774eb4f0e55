"""Batches for a device: how many DataLoader workers a run gets and pinned memory for non-blocking copies to CUDA."""

from __future__ import annotations

import os

import torch

#: DataLoader workers on CUDA by default: half the cores (the rest feed the GPU and compile), at most this many
CUDA_LOADER_WORKERS_CAP = 8


def loader_workers(requested: int | None, device: torch.device) -> int:
    """`requested` when given; else on CUDA min(CUDA_LOADER_WORKERS_CAP, cores // 2) (at least 1), on the CPU 0: there
    the model needs every core and the batches are read in the training process, as they always were."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"DataLoader workers must be 0 or more, got {requested}")
        return requested
    if device.type != "cuda":
        return 0
    return min(CUDA_LOADER_WORKERS_CAP, max(1, (os.cpu_count() or 2) // 2))


def device_batches(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    seed: int | None = None,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """Batches of `dataset` for `device`: in order (`seed` None) or shuffled by the loader's generator (seeded with
    `seed`; reseed `loader.generator` before a pass to fix that pass's order); pinned on CUDA so that
    `.to(device, non_blocking=True)` overlaps the copy with compute. Workers persist from pass to pass (no fork and
    no copy of the dataset per epoch); each draws its random augmentations from a seed taken when it started."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=seed is not None,
        drop_last=drop_last,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


__all__ = ["CUDA_LOADER_WORKERS_CAP", "device_batches", "loader_workers"]
