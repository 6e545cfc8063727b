"""``python -m fxadapt``: the same as the ``fxadapt`` command."""

import sys

from .cli import main

sys.exit(main())
