"""The training batches of a segmentation run: cached cases, crops in worker processes.

Every item is `(epoch, position, case)`; its random draws (crop centres, augmentation) are
seeded from `(seed, rank, epoch, position)` alone, so a batch is the same whichever worker
makes it, however many workers there are, and when a resumed run redraws a lost epoch.
One DataLoader iterator runs over all epochs: its workers start once, keep the next
batches ready while the model trains, and are not restarted at every epoch (an epoch of a
small dataset is a step or two). Cases are preprocessed into the cache by the worker that
first needs one (`case_cache`), so the first step does not wait for the whole dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset, Sampler

from medvit.pipelines.case_cache import CachedCase, CaseCache
from medvit.pipelines.errors import DatasetError, MedvitError
from medvit.pipelines.loop import epoch_seed

__all__ = ["CropDataset", "EpochLoader", "default_workers"]


def default_workers(device: torch.device) -> int:
    """Worker processes for augmentation: on a GPU all but one core (at most 8); on a CPU,
    which trains on the same cores, one per four cores and at least one once there are two."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores < 2 else max(1, cores // 4)


@dataclass(frozen=True)
class _Failure:
    """A user-caused error in a worker, carried to the main process as one line."""

    message: str


def _collate(items: list[Any]) -> Any:
    failure = next((i for i in items if isinstance(i, _Failure)), None)
    return failure if failure is not None else list_data_collate(items)


class CropDataset(Dataset):
    """Random crops of cached cases; an item `(epoch, position, index)` gives case `index`'s crops."""

    def __init__(self, cases: Sequence[Any], cache: CaseCache, transform: Compose, seed: int, rank: int) -> None:
        self.cases = list(cases)
        self.cache = cache
        self.transform = transform
        self.seed, self.rank = int(seed), int(rank)
        self._cached: dict[int, CachedCase] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def case(self, index: int) -> CachedCase:
        if index not in self._cached:
            self._cached[index] = self.cache.get(self.cases[index])
        return self._cached[index]

    def __getitem__(self, item: tuple[int, int, int]) -> Any:
        epoch, position, index = item
        try:
            seed = int(np.random.SeedSequence([self.seed, self.rank, epoch, position]).generate_state(1)[0])
            self.transform.set_random_state(seed=seed)
            return self.transform({"case": self.case(index)})
        except MedvitError as exc:
            return _Failure(str(exc))


class _EpochBatches(Sampler):
    """Batches of `(epoch, position, index)` from `start_epoch` on, each epoch a fresh permutation."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int) -> None:
        self.n, self.batch_size, self.seed, self.rank = n, batch_size, seed, rank
        self.start_epoch = 0

    def per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return self.per_epoch()

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self.start_epoch
        while True:
            order = np.random.default_rng(epoch_seed(self.seed, self.rank, epoch)).permutation(self.n)
            for lo in range(0, self.n, self.batch_size):
                yield [(epoch, p, int(order[p])) for p in range(lo, min(lo + self.batch_size, self.n))]
            epoch += 1


class EpochLoader:
    """Iterating gives one epoch's batches; `set_epoch` says which epoch comes next.

    The DataLoader iterator (and its workers) lives across epochs and is only restarted when
    the next epoch is not the one it is on (a resumed run, or an epoch left half-way).
    """

    def __init__(self, dataset: CropDataset, batch_size: int, workers: int, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.sampler = _EpochBatches(len(dataset), batch_size, dataset.seed, dataset.rank)
        self.loader = DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
            prefetch_factor=2 if workers else None,
        )
        self._it: Iterator[Any] | None = None
        self._next: int | None = None  # the epoch the iterator starts next; None: mid-epoch

    def __len__(self) -> int:
        return self.sampler.per_epoch()

    def set_epoch(self, epoch: int) -> None:
        if self._it is not None and self._next == epoch:
            return
        self.close()
        self.sampler.start_epoch = epoch
        self._it, self._next = iter(self.loader), epoch

    def __iter__(self) -> Iterator[Any]:
        if self._it is None:
            self.set_epoch(0)
        epoch, self._next = self._next, None
        for _ in range(len(self)):
            batch = next(self._it)
            if isinstance(batch, _Failure):
                self.close()
                raise DatasetError(batch.message)
            yield batch
        self._next = epoch + 1 if epoch is not None else None

    def close(self) -> None:
        """Stop the workers."""
        self._it, self._next = None, None
