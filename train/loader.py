"""Batches of in-memory uint8 data, gathered by index, with per-image augmentation done ahead.

Each epoch's order and each batch's augmentation are derived from (seed, epoch, batch), never
from running state, so a resumed run draws exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .augment import album_pipeline, apply_album

PREFETCH = 3  # batches augmented ahead in threads while the model trains on the current one


def stream_seed(*key: int, rank: int = 0, world_size: int = 1) -> int:
    """The seed of one random stream (an epoch's, a batch's) from ``key``; under DDP each rank's own, so that the
    ranks' shards of a global batch are not all cropped, flipped and transformed alike (one process: unchanged)."""
    return hash(key + ((rank,) if world_size > 1 else ())) & 0x7FFFFFFF


class BatchLoader:
    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        album_strength: float | None = None,
        workers: int = 1,
        prefetch: int = PREFETCH,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        device: torch.device | None = None,
        alternate_flip: bool = False,
    ) -> None:
        self.x, self.y = x, torch.from_numpy(np.asarray(y, dtype=np.int64))
        # On a GPU the whole uint8 set (150 MB for CIFAR-10) lives in device memory and batches are
        # gathered there: no host-to-device copy per batch. Per-image albumentations need host arrays.
        self.resident = None
        if device is not None and album_strength is None:
            self.resident = (torch.from_numpy(np.ascontiguousarray(x)).to(device), self.y.to(device))
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.album_strength = seed, album_strength
        self.workers, self.prefetch = max(0, workers), max(1, prefetch)  # workers 0: augment inline
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self._local = threading.local()
        # Alternating flip (airbench): a fixed random half of the images is mirrored in even epochs, the
        # other half in odd ones, so every image is seen both ways within any two epochs (random flips
        # show a quarter of them the same way twice running). Derived from the seed: resume stays exact.
        self.flip_bits = None
        if alternate_flip:
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
            self.flip_bits = rng.integers(0, 2, len(x)).astype(bool)

    def _indices(self, epoch: int) -> np.ndarray:
        n = len(self.x)
        idx = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
        if self.world_size > 1:  # every rank takes an equal shard of the same permutation
            per_rank = n // self.world_size
            idx = idx[: per_rank * self.world_size][self.rank :: self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self.x) // self.world_size if self.world_size > 1 else len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        idx = self._indices(epoch)
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
        return [idx[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def mirrored(self, epoch: int, idx: np.ndarray) -> np.ndarray | None:
        """Which images of ``idx`` alternating flip mirrors in ``epoch`` (None: flips are random, elsewhere)."""
        return None if self.flip_bits is None else self.flip_bits[idx] ^ bool(epoch % 2)

    def _make(self, epoch: int, b: int, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        flips = self.mirrored(epoch, idx)
        if self.resident is not None:
            x_dev, y_dev = self.resident
            i = torch.from_numpy(idx).to(x_dev.device, non_blocking=True)
            xb = x_dev[i]
            if flips is not None:
                m = torch.from_numpy(flips).to(x_dev.device, non_blocking=True).view(-1, 1, 1, 1)
                xb = torch.where(m, xb.flip(2), xb)
            return xb, y_dev[i]
        xb = self.x[idx]  # a copy (fancy indexing): safe to mirror in place
        if flips is not None:
            xb[flips] = xb[flips, :, ::-1]
        if self.album_strength:
            pipe = getattr(self._local, "pipe", None)
            if pipe is None:  # one pipeline per thread: its random state is not shared
                pipe = self._local.pipe = album_pipeline(self.x.shape[-1], self.album_strength)
            xb = apply_album(pipe, xb, seed=stream_seed(self.seed, epoch, b, rank=self.rank, world_size=self.world_size))
        xt = torch.from_numpy(xb)
        if self.pin_memory:
            xt = xt.pin_memory()
        return xt, self.y[idx]

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 NHWC images, int64 labels), on the CPU (the engine moves them) or already on
        the device the data lives on."""
        batches = self._batches(epoch)
        if not self.album_strength or not self.workers:
            for b, idx in enumerate(batches):
                yield self._make(epoch, b, idx)
            return
        # Augment ahead in worker threads (OpenCV releases the GIL) while the model trains.
        with ThreadPoolExecutor(self.workers, thread_name_prefix="augment") as pool:
            pending: deque = deque()
            for b, idx in enumerate(batches):
                pending.append(pool.submit(self._make, epoch, b, idx))
                if len(pending) > self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
