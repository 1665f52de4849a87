"""`python -m mobile_moe.cli ...` runs the CLI, as the `mobile-moe` command does."""

import sys

from mobile_moe.cli import main

sys.exit(main())
