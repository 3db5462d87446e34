"""Entry point for launchers: ``accelerate launch train.py --config configs/...`` runs exactly
what ``scalegen train --config ...`` runs (same arguments)."""
import sys

from scalegen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
