"""The demo's limits and defaults, in one leaf module (it imports only the standard library) that both the
command line and the app read, so neither has to import the other."""

import os

UPLOAD_LIMIT = "10mb"
QUEUE_SIZE = 64  # waiting requests beyond this are refused with "queue full" instead of piling up
BATCH_SIZE = 16  # uploads merged into one forward pass


def serving_threads(cores: int | None = None) -> int:
    """The demo's default number of torch threads for its forward passes: half the CPU cores this process
    may run on, at least one. The other half is left to the HTTP side (Gradio's event loop, decoding,
    encoding), which the forward pass's OpenMP threads would otherwise compete with: on a 2-core AVX2 CPU the
    served forward pass was 1-2 ms shorter on one thread than on two in 4 of 5 paired runs (end to end, the
    host's drift was larger than the difference; docs/demo.md)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)
