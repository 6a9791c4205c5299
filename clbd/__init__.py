"""The application layer: the ``clbd`` command and its tools. It imports the libraries (``poisoning``,
``datamodules``, ``lightning_modules``, ``defenses``); nothing in them imports it back.

- ``dispatch``: ``clbd COMMAND``: sends each command to its tool or to the runner.
- ``runner``: LightningCLI's fit / validate / test / predict, the run directory's logs and checkpoints.
- ``run_dir``: run directories: never start a run over another, resume only what the same config began.
- ``data``, ``poison``, ``demo``, ``experiment``: ``clbd data`` / ``poison`` / ``demo`` / ``experiment``.
"""

from .dispatch import main

__all__ = ["main"]
