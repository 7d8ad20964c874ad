"""``python -m mlxrunner ...``: the same as the ``mlxrunner`` command."""

import sys

from mlxrunner.cli import main

sys.exit(main())
