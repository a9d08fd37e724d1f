"""`clipzss check-data` (parsing still in clipzss.data.doctor: being moved here)."""

from clipzss.data.doctor import EPILOG, HELP, add_arguments, run  # noqa: F401
