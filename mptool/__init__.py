"""mptool: uniform structured pruning (MaskPrune) to plain, engine-ready checkpoints."""

__version__ = "0.1.0"

from mptool.errors import MptoolError  # noqa: E402

__all__ = ["MptoolError", "__version__"]
