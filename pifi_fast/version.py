"""The installed pifi_fast's version: one helper that the package, checkpoints and model cards
all read (it imports nothing of the package, so any module may take it)."""
from __future__ import annotations

from importlib import metadata


def installed_version() -> str:
    """The installed distribution's version: a build with the compiled extension names the torch
    it was compiled against (0.1.0+torch2.14cu130); "0.1.0" when run from a tree that was never
    installed."""
    try:
        return metadata.version("pifi-fast")
    except metadata.PackageNotFoundError:
        return "0.1.0"
