"""``python -m clbd ARGS`` is ``clbd ARGS``."""

import sys

from .dispatch import main

sys.exit(main())
