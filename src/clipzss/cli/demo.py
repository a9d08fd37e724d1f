"""`clipzss demo` (parsing still in clipzss.demo: being moved here)."""

from clipzss.demo import EPILOG, HELP, add_arguments, run  # noqa: F401
