"""`clipzss prepare-data` (parsing still in clipzss.data.prepare: being moved here)."""

from clipzss.data.prepare import EPILOG, HELP, add_arguments, run  # noqa: F401
