"""`python -m fastdit` runs the command line."""

import sys

from fastdit.cli import main

sys.exit(main())
