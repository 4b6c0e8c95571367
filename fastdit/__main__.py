"""`python -m fastdit` runs the command line."""

import sys

from fastdit.cli.main import main

sys.exit(main())
