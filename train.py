"""Train stellarlm: a thin entry point over stellarlm.training (same options as `stellarlm train`).

    python train.py --out runs/default --steps 6000          # train on the embedded data
    python train.py --out runs/default --steps 6000 --resume # continue a killed run
"""

import sys

from stellarlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
