"""`python -m zviz ...`: the same as the `zviz` command."""

import sys

from ._cliclient import main

sys.exit(main())
