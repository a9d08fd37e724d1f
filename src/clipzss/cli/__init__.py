"""`clipzss <command>`: the one command-line layer over the Python API. `main(argv)` runs in-process for tests.

Every command is a module of this package with ``HELP``, an optional ``EPILOG``, ``add_arguments(parser)`` and
``run(args) -> int``. The modules import only the standard library at the top and the library inside ``run``, so
``clipzss --help`` stays fast and no library module ever sees argparse.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Sequence

from clipzss.errors import ClipzssError

logger = logging.getLogger("clipzss")

# command name -> module of clipzss.cli, in the order `clipzss --help` lists them.
COMMANDS = {
    "train": "train",
    "eval": "eval",
    "predict": "predict",
    "embed-text": "embed_text",
    "quickstart": "quickstart",
    "prepare-data": "prepare_data",
    "check-data": "check_data",
    "inspect-pseudo-labels": "inspect_pseudo_labels",
    "export": "export",
    "demo": "demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipzss",
        description="Zero-shot semantic segmentation with a CLIP teacher (CLIP-ZSS): train, evaluate, predict.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"clipzss.cli.{module_name}")
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=getattr(module, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(func=module.run, command_parser=p)
    return parser


_WORKER_ERROR = re.compile(r"Caught (?P<type>\w+) in DataLoader worker process \d+\.")


def user_message(err: BaseException) -> str:
    """The one line a user sees for an error: its message's first line, whatever process raised it.

    An error in a data-loading worker reaches us re-raised by torch as "Caught ValueError in DataLoader worker
    process 0." followed by the worker's traceback; the line that matters (the file and what is wrong with it) is
    the original exception's message at the end of that traceback.
    """
    if isinstance(err, OSError) and err.errno is not None and str(err).startswith("[Errno"):
        from clipzss.files import os_error_message  # torch-free

        return os_error_message(err)
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = text.splitlines()
    found = _WORKER_ERROR.match(lines[0])
    if found and len(lines) > 1 and lines[1].startswith("Original Traceback"):
        # The traceback ends with "[module.]Type: message"; a message of several lines starts on that line.
        head = re.compile(rf"^(?:[\w.]+\.)?{re.escape(found['type'])}: (?P<message>.+)$")
        for line in reversed(lines[2:]):
            original = head.match(line)
            if original:
                return original["message"].strip()
    return lines[0]


class _ThirdPartyNoise(logging.Filter):
    """Drops other libraries' log lines that only confuse a user of the CLI: open_clip's "No pretrained weights
    loaded" (we say loudly, once, when a teacher is random; and the CLI loads real weights after building)."""

    NOISE = ("No pretrained weights loaded for model",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.NOISE))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``section.key=value`` overrides accepted after options too.

    argparse assigns a command's positionals once, where the first of them appears, so the overrides in
    ``train CONFIG --resume RUN train.max_iters=30`` come back unrecognised; they join the others, in order. Any
    other leftover is refused by the command's own parser, whose usage is the one that helps.
    """
    args, extras = build_parser().parse_known_args(argv)
    if extras:
        overrides = getattr(args, "overrides", None)
        if isinstance(overrides, list) and not any(item.startswith("-") for item in extras):
            overrides.extend(extras)
        else:
            args.command_parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def is_users_to_fix(err: BaseException) -> bool:
    """A `ClipzssError`, an OSError (a file, a disk, the network) or memory running out (torch's
    OutOfMemoryError is matched by name: the CLI never imports torch for this): one line, not a traceback."""
    return isinstance(err, ClipzssError | OSError | MemoryError) or type(err).__name__ == "OutOfMemoryError"


def bug_report_line() -> str:
    """What follows the traceback of an error that is not the user's: a bug of this version, to be reported."""
    from clipzss import __version__

    return (
        f"this is a bug in clipzss {__version__}, not a mistake of yours: please report it with the command "
        "and the traceback above"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. An error the user can fix (`is_users_to_fix`) prints one line on stderr and returns 2
    (CLIPZSS_DEBUG=1 shows its traceback); any other exception is a bug: its traceback, how to report it, 1."""
    args = parse_args(argv)
    # Our own messages at INFO; third-party libraries (open_clip logs at INFO on the root logger) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipzss").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # torch's weights-only unpickler warns about any pickle protocol but 2; the file is refused or read all the same.
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    root = logging.getLogger()  # open_clip logs through the root logger
    if not any(isinstance(f, _ThirdPartyNoise) for f in root.filters):
        root.addFilter(_ThirdPartyNoise())
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"clipzss {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_users_to_fix(err):
            traceback.print_exc()
            print(f"clipzss {args.command}: {bug_report_line()}", file=sys.stderr)
            return 1
        if os.environ.get("CLIPZSS_DEBUG"):
            raise
        print(f"clipzss {args.command}: error: {user_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
