"""``python -m linear_probe`` is the ``linear-probe`` command."""

import sys

from linear_probe.cli import main

sys.exit(main())
