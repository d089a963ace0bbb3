"""``python -m train ...`` (and ``torchrun -m train ...``) is ``reslab train ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
