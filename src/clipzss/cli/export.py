"""`clipzss export` (parsing still in clipzss.export: being moved here)."""

from clipzss.export import EPILOG, HELP, add_arguments, run  # noqa: F401
