"""The one boundary between user errors and bugs.

Anything the user can fix (a bad path, an illegal target, an empty corpus) raises
:class:`MptoolError`; the CLI prints its message on one line and exits non-zero. Any other
exception is a bug and keeps its traceback.
"""


class MptoolError(Exception):
    """Bad input: the message names the problem and what would be accepted."""


class ParityError(MptoolError):
    """An exported artefact disagrees with PyTorch beyond the stated tolerance."""
