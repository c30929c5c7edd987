"""mptool: uniform structured pruning (MaskPrune) to plain, engine-ready checkpoints."""

from __future__ import annotations

__version__ = "0.1.0"

from mptool.errors import MptoolError  # noqa: E402



def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


__all__ = ["MptoolError", "__version__", "package_version"]
