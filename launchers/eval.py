#!/usr/bin/env python
"""`thanora-eval` as a script, for launchers that take a file (`deepspeed launchers/eval.py ...`, torchrun, srun):
the command itself is thanora_ds/cli/eval.py (`--help` for its usage)."""
import sys

from thanora_ds.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
