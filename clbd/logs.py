"""One quiet log for every clbd command: clbd's own messages at INFO, other libraries' at WARNING unless asked.

Libraries that log through the root logger (open_clip's "Parsing tokenizer identifier ..." on every tokenizer it
builds, for one) would otherwise repeat their INFO lines dozens of times in a demo. ``CLBD_LOG_LEVEL=INFO`` (or
``DEBUG``), or the global flag ``clbd --verbose COMMAND ...``, shows them again. Lightning keeps its own logger
(its trainer banners and model summary), which this leaves as Lightning sets it.
"""

from __future__ import annotations

import logging
import os

LOG_LEVEL_ENV = "CLBD_LOG_LEVEL"
# clbd's own loggers: "clbd.*" by name, and the library packages' module loggers (``logging.getLogger(__name__)``).
CLBD_LOGGERS = ("clbd", "datamodules", "poisoning", "lightning_modules", "defenses")
FORMAT = "%(levelname)s %(name)s: %(message)s"


def library_level() -> int:
    """The level other libraries log at: ``CLBD_LOG_LEVEL`` when set, WARNING otherwise."""
    name = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if not name:
        return logging.WARNING
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"{LOG_LEVEL_ENV}={name!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    return level


def configure_logging() -> None:
    """Root (and so every library logging through it) at ``library_level()``; clbd's loggers at INFO or lower.
    Idempotent: each step of a demo or an experiment calls it again."""
    level = library_level()
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger().setLevel(level)  # basicConfig leaves the level alone when a handler exists already
    for name in CLBD_LOGGERS:
        logging.getLogger(name).setLevel(min(level, logging.INFO))


def take_verbose_flag(argv: list[str]) -> list[str]:
    """``clbd --verbose|-v COMMAND ...``: the leading flag sets ``CLBD_LOG_LEVEL=INFO`` (unless set already, and
    inherited by any process a command starts) and is removed from the command line."""
    if argv and argv[0] in ("-v", "--verbose"):
        if not os.environ.get(LOG_LEVEL_ENV):
            os.environ[LOG_LEVEL_ENV] = "INFO"
        return argv[1:]
    return argv
