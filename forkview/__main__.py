"""`python -m forkview` behaves exactly like the `forkview` command."""

import sys

from forkview.cli import main

sys.exit(main())
