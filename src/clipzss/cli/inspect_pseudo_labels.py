"""`clipzss inspect-pseudo-labels` (parsing still in clipzss.inspect: being moved here)."""

from clipzss.inspect import EPILOG, HELP, add_arguments, run  # noqa: F401
