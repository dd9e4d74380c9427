"""`python -m zviz ...`: the same as the `zviz` command."""

import sys

from ._cli import main

sys.exit(main())
