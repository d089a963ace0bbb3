"""``reslab train`` under torchrun with two spies, for tests/test_scaleout.py.

Run as ``torchrun --nproc-per-node=2 tests/ddp_spy.py OUT_DIR <reslab train args>``. It records,
per rank, which training images each of an epoch's batches held (the loader's indices) and which images
each evaluation predicted (a digest of every row) and a digest of its final weights, writes them to ``OUT_DIR/rank<R>.json``, and
otherwise runs the real command unchanged. The spies observe; they change no result.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from train import distributed
from train.cli import main
from train.loader import BatchLoader

seen: dict = {"train": {}, "eval": []}

_batches = BatchLoader._batches


def spy_batches(self: BatchLoader, epoch: int) -> list[np.ndarray]:
    batches = _batches(self, epoch)
    if self.shuffle:  # the training loader (evaluation does not shuffle)
        seen["train"][str(epoch)] = [[int(i) for i in b] for b in batches]
    return batches


def digest(rows: np.ndarray) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest()[:16] for r in rows]


_sharded = distributed.sharded


def spy_sharded(fn, x, ctx):
    record = {"all": digest(x), "mine": []}

    def mine(part):
        record["mine"] = digest(part)
        return fn(part)

    out = _sharded(mine, x, ctx)
    seen["eval"].append(record)
    return out


models: list = []
_wrap = distributed.wrap


def spy_wrap(model, ctx, device):
    models.append(model)
    return _wrap(model, ctx, device)


def weights_digest() -> str:
    """The trained weights of this rank: DDP keeps them identical on every rank, or it did not
    average the gradients."""
    h = hashlib.sha1()
    for p in models[-1].parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    out_dir, args = Path(sys.argv[1]), sys.argv[2:]
    BatchLoader._batches = spy_batches
    distributed.sharded = spy_sharded
    distributed.wrap = spy_wrap
    try:
        main(["train", *args])
    finally:
        seen["weights"] = weights_digest() if models else None
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
