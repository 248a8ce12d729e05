"""`python -m jp_peft.cli` = `jp-peft`."""

import sys

from jp_peft.cli import main

if __name__ == "__main__":  # not when a child process re-imports the parent's main module (as __mp_main__)
    sys.exit(main())
