"""reslab's malloc settings (train/allocator.py) really keep freed tensor memory in the process:
allocating and freeing a 64 MB tensor again and again faults its pages in while the heap grows, then
no more; glibc's defaults fault them in every time."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import resource, torch
from train.allocator import keep_freed_memory
print(keep_freed_memory())
for _ in range(10):  # the first few times always fault the pages in (the heap grows to its working size)
    torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    t = torch.empty(16 << 20).fill_(1.0)  # 64 MB, freed at the next assignment
    del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(malloc: str) -> tuple[str, int]:
    env = {**os.environ, "RESLAB_MALLOC": malloc}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
    setting, faults = out.strip().splitlines()[-2:]
    return setting, int(faults)


def test_freed_tensor_memory_is_reused_without_page_faults():
    default_setting, default_faults = _faults("default")
    setting, faults = _faults("")
    assert default_setting.startswith("glibc malloc defaults")
    assert setting == "glibc malloc: mmap off, trim above 1 GiB (reslab)"
    pages = 20 * (64 << 20) // 4096  # what faulting every allocation in again costs
    assert default_faults > pages / 2, default_faults  # glibc's default unmaps and faults again each time
    assert faults < pages / 20, (faults, default_faults)  # reslab's settings reuse the memory
