"""Network-scale memory and time of a training step, standard BatchNorm vs InPlace-ABN: a script
form of ``inplace-abn bench`` (inplace_abn/tools/bench.py), taking the same arguments."""

import sys

from inplace_abn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
