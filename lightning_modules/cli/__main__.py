"""``python -m lightning_modules.cli ARGS`` is ``clbd ARGS``."""

import sys

from .dispatch import main

sys.exit(main())
