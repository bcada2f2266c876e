#!/usr/bin/env python
"""`thanora-train` as a script, for launchers that take a file (`deepspeed launchers/train.py ...`, torchrun, srun):
the command itself is thanora_ds/cli/train.py (`--help` for its usage)."""
import sys

from thanora_ds.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
