"""`clipzss demo`."""

from __future__ import annotations

import argparse

from clipzss.cli._common import add_baseline_arg, add_device_arg
from clipzss.errors import CannotRunError, UsageError

HELP = "open a local web demo: segment images with any class names, compare with training-free CLIP"
EPILOG = """examples:
  clipzss demo --checkpoint runs/quickstart
  clipzss demo --checkpoint runs/voc --teacher-weights ViT-B-16.safetensors --examples photos/
  clipzss demo --baseline maskclip --teacher-weights ViT-B-16.safetensors --port 8080

The page is served on http://127.0.0.1:7860 (this machine only); --host 0.0.0.0 exposes it to the network.
Uploads are bounded (20 MB, 16 megapixels, 256 class names a request) and 32 class lists stay embedded in
memory, unless told otherwise. Needs the demo extra: pip install 'clipzss[demo]'."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are None here and the library's (clipzss.demo.DEFAULT_*) apply: one place for each limit.
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint file, run folder or hub id of a student"
    )
    add_baseline_arg(parser, "serve CLIP itself, training-free, with this recipe")
    parser.add_argument("--teacher-weights", default=None, help="local CLIP weights for the text classifier")
    parser.add_argument("--examples", nargs="*", default=(), help="example images or folders of images")
    parser.add_argument(
        "--host", default=None, help="address to bind (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860)")
    parser.add_argument("--max-pixels", type=int, default=None, help="largest image accepted, in pixels")
    parser.add_argument("--max-file-size", default=None, help="largest upload, e.g. 20mb")
    parser.add_argument("--max-classes", type=int, default=None, help="most class names per request")
    parser.add_argument(
        "--text-cache-size",
        type=int,
        default=None,
        help="class lists whose text embeddings are kept in memory",
    )
    add_device_arg(parser)


def run(args: argparse.Namespace) -> int:
    from clipzss.names import MAX_CLASS_NAMES

    if args.max_classes is not None and args.max_classes > MAX_CLASS_NAMES:
        raise UsageError(
            f"--max-classes {args.max_classes} is more than clipzss handles at once ({MAX_CLASS_NAMES})"
        )
    try:
        from clipzss import demo
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("gradio", "fastapi", "uvicorn"):
            raise CannotRunError(
                f"the demo needs the demo extra ({err}): pip install 'clipzss[demo]'"
            ) from None
        raise

    def given(value: object, default: object) -> object:
        return default if value is None else value

    max_classes = given(args.max_classes, demo.DEFAULT_MAX_CLASSES)
    text_cache_size = given(args.text_cache_size, demo.DEFAULT_TEXT_CACHE_SIZE)
    if max_classes < 1 or text_cache_size < 1:
        raise UsageError("--max-classes and --text-cache-size must be at least 1")

    primary, baseline = demo.load_models(args.checkpoint, args.baseline, args.teacher_weights, args.device)
    app = demo.build_app(
        primary,
        baseline,
        examples=demo.find_examples(args.examples),
        max_pixels=given(args.max_pixels, demo.DEFAULT_MAX_PIXELS),
        max_classes=max_classes,
        text_cache_size=text_cache_size,
    )
    demo.launch(
        app,
        host=given(args.host, demo.DEFAULT_HOST),
        port=given(args.port, demo.DEFAULT_PORT),
        max_file_size=given(args.max_file_size, demo.DEFAULT_MAX_FILE_SIZE),
        block=True,
    )
    return 0
