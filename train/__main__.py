"""``python -m train ...`` (and ``torchrun -m train ...``) is ``reslab train ...``."""

import sys

from .cli import main
from .distributed import worker_exit

if __name__ == "__main__":
    worker_exit(lambda: main(["train", *sys.argv[1:]]))
