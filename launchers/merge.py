#!/usr/bin/env python
"""`thanora-merge` as a script, for launchers that take a file (`deepspeed launchers/merge.py ...`, torchrun, srun):
the command itself is thanora_ds/cli/merge.py (`--help` for its usage)."""
import sys

from thanora_ds.cli.merge import main

if __name__ == "__main__":
    sys.exit(main())
