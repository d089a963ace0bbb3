"""``python -m tune ...`` (and ``torchrun -m tune ...``, what ``reslab tune --nproc N`` runs) is ``reslab tune ...``."""

import sys

from train.cli import main
from train.distributed import worker_exit

if __name__ == "__main__":
    worker_exit(lambda: main(["tune", *sys.argv[1:]]))
