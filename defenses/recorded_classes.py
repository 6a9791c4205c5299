"""Class paths a checkpoint records resolve only among clbd's own classes, never by importing the name.

A checkpoint's ``clbd_run_config`` names the classes that built its run: ``model.class_path`` (a
``lightning_modules`` or ``defenses`` module), ``data.class_path`` (a ``datamodules`` data module) and, inside the
data section, the attack's and its trigger's (``poisoning``). Importing such a name would let a file from elsewhere
choose a module for clbd to import, and so run that module's top-level code. clbd looks each name up among the
classes its own packages export and refuses any other name before importing anything.
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path

# The packages whose exported classes a clbd run config can name (fixed names: importing them runs clbd's own code).
CLBD_PACKAGES = ("lightning_modules", "defenses", "datamodules", "poisoning")


class UnknownRecordedClassError(ValueError):
    """A checkpoint records a class path that is not one of clbd's own classes; nothing was imported."""


@cache
def clbd_classes() -> dict[str, type]:
    """Every class clbd's packages export, under its public path (``lightning_modules.CLIP``) and its defining
    one (``lightning_modules.clip.CLIP``)."""
    found: dict[str, type] = {}
    for package in CLBD_PACKAGES:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if isinstance(obj, type):
                found[f"{package}.{name}"] = obj
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def recorded_class(class_path: object, source: str | Path, field: str) -> type:
    """The clbd class ``class_path`` names, or a clear error naming the file and the class path (before any
    import of it). ``field`` names where the checkpoint was given (e.g. ``model.checkpoint``)."""
    classes = clbd_classes()
    if isinstance(class_path, str) and class_path in classes:
        return classes[class_path]
    public = sorted(path for path in classes if path.count(".") == 1)
    raise UnknownRecordedClassError(
        f"{field}: {source} records class_path {class_path!r}, which is not one of clbd's own classes; it was not "
        f"imported (a checkpoint cannot choose a module for clbd to import). Known: {', '.join(public)}"
    )
