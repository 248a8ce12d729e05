"""`python -m jp_peft.cli` = `jp-peft`."""

import sys

from jp_peft.cli import main

sys.exit(main())
