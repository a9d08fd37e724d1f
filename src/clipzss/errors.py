"""The errors clipzss raises for a user's mistake or situation, under one base class.

`ClipzssError` is what the command line prints as one line: a wrong option, a bad file, a missing download. Any other
exception is a bug in clipzss and keeps its traceback. Each subclass also keeps the builtin base it always had
(``ValueError``, ``OSError``, ...), so code that catches those still works. Standard library only.
"""

from __future__ import annotations


class ClipzssError(Exception):
    """The base of every error clipzss raises for something the user can fix; the message says what and how."""


class UsageError(ClipzssError, ValueError):
    """A value, option or combination of them that clipzss cannot use; the message names it."""


class OfflineError(ClipzssError, FileNotFoundError, RuntimeError):
    """Pretrained weights (the teacher's CLIP or the student's encoder) are not cached and cannot be downloaded.

    A ``FileNotFoundError`` (the file is not here) and, as the teacher's error was before, a ``RuntimeError``.
    """


class CannotRunError(ClipzssError, RuntimeError):
    """What was asked cannot be done here: a missing optional package, an unreadable state, a model that the
    exporter cannot trace."""
