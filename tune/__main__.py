"""``python -m tune ...`` (and ``torchrun -m tune ...``, what ``reslab tune --nproc N`` runs) is ``reslab tune ...``."""

import sys

from train.cli import main

if __name__ == "__main__":
    main(["tune", *sys.argv[1:]])
