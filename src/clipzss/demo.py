"""`clipzss demo`: a local web page (Gradio) to segment an image with any class names, and to compare with CLIP.

The page has two tabs. *Segment*: upload or pick an image, type class names, get the overlay, a legend with each
class's area, and the inference time. *Compare*: the trained student and a training-free baseline picked on the
page (MaskCLIP, ClearCLIP, SCLIP or NACLIP: CLIP itself at inference) side by side on the same image and names,
with their times. It binds 127.0.0.1 unless told
otherwise, bounds the upload size and the image's pixel count (checked from the header, before decoding), and
answers bad input (empty or duplicate class names, too many names, unreadable or huge images) with a message on
the page. The text classifiers it keeps in memory, one per class list asked for, are bounded (least recently used
first out), so a server that runs for days does not grow with every new list.
"""

from __future__ import annotations

import html
import logging
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from clipzss.config import TeacherConfig
from clipzss.data import SYNTHETIC_CLASSES, SyntheticScenes
from clipzss.errors import UsageError
from clipzss.images import IMAGE_SUFFIXES, load_image
from clipzss.models.recipes import BASELINES, baseline_eval_config
from clipzss.models.segmenter import LRUCache, Segmenter, TrainingFreeSegmenter, ZeroShotSegmenter
from clipzss.models.teacher import CLIPTeacher, build_teacher
from clipzss.names import parse_class_names
from clipzss.visualize import blend, class_areas, palette

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_PIXELS = 16_000_000
DEFAULT_MAX_FILE_SIZE = "20mb"
DEFAULT_MAX_CLASSES = 256  # class names per request: each costs a text-encoder pass and a logit map
DEFAULT_TEXT_CACHE_SIZE = 32  # class lists whose text embeddings stay in memory, per model
IMAGE_HEIGHT = 360  # px on the page; the images themselves keep their size
# Prompt choices shown when the text encoder is CLIP; None = the model's own template ensemble.
TEMPLATES: dict[str, tuple[str, ...] | None] = {
    "the model's prompt ensemble": None,
    "a photo of a {}.": ("a photo of a {}.",),
    "a photo of a {} in the scene.": ("a photo of a {} in the scene.",),
    "the name alone": ("{}",),
}

# --- models -----------------------------------------------------------------------------------------------------


def load_models(
    checkpoint: str | None, baseline: str | None, teacher_weights: str | None = None, device: str = "auto"
) -> tuple[ZeroShotSegmenter, ZeroShotSegmenter | None]:
    """The model the page serves and, for a student whose text encoder is CLIP, MaskCLIP on that same CLIP (the
    comparison tab switches to the other recipes)."""
    if bool(checkpoint) == bool(baseline):
        raise UsageError(f"give exactly one of --checkpoint CKPT or --baseline {'|'.join(BASELINES)}")
    if baseline:
        cfg = TeacherConfig() if teacher_weights is None else TeacherConfig(weights=teacher_weights)
        return TrainingFreeSegmenter(build_teacher(cfg, device=device), recipe=baseline), None
    if Path(checkpoint).exists():
        student = Segmenter.from_checkpoint(checkpoint, device=device, teacher_weights=teacher_weights)
    else:
        student = Segmenter.from_pretrained(checkpoint, device=device, teacher_weights=teacher_weights)
    return student, comparison_baseline(student)


def comparison_baseline(student: ZeroShotSegmenter, recipe: str = "maskclip") -> ZeroShotSegmenter | None:
    """A training-free recipe on the student's own CLIP, or None without a CLIP.

    Same names and inference settings as the student, except the recipe's released input handling (short side,
    windows; none for MaskCLIP): `clipzss.models.recipes.baseline_eval_config`.
    """
    encoder = student.text_encoder
    if not isinstance(encoder, CLIPTeacher):
        return None
    eval_cfg = baseline_eval_config(recipe, student.eval_cfg)
    return TrainingFreeSegmenter(encoder, eval_cfg=eval_cfg, alpha=student.alpha, recipe=recipe)


def describe(model: ZeroShotSegmenter) -> str:
    """One line naming the model, for the page header and the comparison columns."""
    if isinstance(model, Segmenter):
        s = model.config.student
        step = model.meta.get("step")
        return f"clipzss student {s.arch}/{s.encoder}" + (f" (step {step})" if step else "")
    if isinstance(model, TrainingFreeSegmenter):
        return f"{model.title} baseline (CLIP at inference)"
    return "training-free baseline (CLIP at inference)"


def bound_text_caches(models: Sequence[ZeroShotSegmenter | None], size: int) -> None:
    """Keep at most ``size`` class lists' text embeddings in memory per model and per CLIP text encoder.

    Both the segmenter (classifiers on its device) and a CLIP teacher (its own copies) cache by class list; a
    server asked for new lists all day must drop the least recently used ones. The teacher's disk cache (one
    small file per list, under the user's cache folder) is left as it is.
    """
    for model in models:
        if model is None:
            continue
        for owner in (model, getattr(model, "text_encoder", None)):
            cache = getattr(owner, "_text_cache", None)
            if cache is None or (isinstance(cache, LRUCache) and cache.max_size == size):
                continue
            bounded = LRUCache(size)
            for key in list(cache)[-size:]:
                bounded[key] = cache[key]
            owner._text_cache = bounded


def check_class_count(names: Sequence[str], max_classes: int) -> None:
    """Refuse a request with more class names than the page allows (`--max-classes`)."""
    if len(names) > max_classes:
        raise UsageError(
            f"{len(names)} class names given; this demo accepts at most {max_classes} per request "
            "(start it with --max-classes N for more)"
        )


def _random_teacher(model: ZeroShotSegmenter) -> bool:
    cfg = getattr(getattr(model, "text_encoder", None), "cfg", None)
    return getattr(cfg, "weights", "") == "none"


# --- the work behind the page -----------------------------------------------------------------------------------


@dataclass
class Segmentation:
    """What one click returns: the overlay at the image's size, the legend rows and the time it took."""

    overlay: Image.Image
    class_names: list[str]
    areas: list[float]  # fraction of the image per class, in class order
    image_seconds: float
    text_seconds: float
    size: tuple[int, int]  # (width, height)


def open_bounded(path: str | Path, max_pixels: int) -> Image.Image:
    """Open an uploaded image as upright RGB, refusing it from its header when it has too many pixels."""
    try:
        with Image.open(path) as header:
            width, height = header.size
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise UsageError(f"cannot read the uploaded file as an image ({err})") from None
    if width * height > max_pixels:
        raise UsageError(
            f"the image is {width}×{height} ({width * height / 1e6:.1f} MP); this demo accepts up to "
            f"{max_pixels / 1e6:.1f} MP: resize it and try again"
        )
    return load_image(path)


def segment(
    model: ZeroShotSegmenter,
    image: Image.Image,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
) -> Segmentation:
    """Segment ``image`` and time the two parts: embedding the names (cached afterwards) and the image itself."""

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    tic = time.perf_counter()
    model.text_classifier(class_names, templates)
    sync()
    text_s = time.perf_counter() - tic
    tic = time.perf_counter()
    mask = model.predict(image, class_names, templates=templates)
    sync()
    image_s = time.perf_counter() - tic
    return Segmentation(
        overlay=blend(image, mask, len(class_names)),
        class_names=list(class_names),
        areas=class_areas(mask, len(class_names)).tolist(),
        image_seconds=image_s,
        text_seconds=text_s,
        size=image.size,
    )


def legend_html(result: Segmentation) -> str:
    """A table of colour swatch, class name and area, largest area first (names escaped: they are user input)."""
    colours = palette(len(result.class_names))
    order = sorted(range(len(result.class_names)), key=lambda i: -result.areas[i])
    rows = "".join(
        f'<tr><td><span class="swatch" style="background: rgb{tuple(int(c) for c in colours[i])}"></span></td>'
        f'<td class="name">{html.escape(result.class_names[i])}</td>'
        f'<td class="area">{100 * result.areas[i]:.1f}%</td></tr>'
        for i in order
    )
    return f'<table class="legend"><tr><th></th><th>class</th><th>area</th></tr>{rows}</table>'


def timing_text(result: Segmentation, model: ZeroShotSegmenter) -> str:
    width, height = result.size
    return (
        f"**{1000 * result.image_seconds:.0f} ms** for the {width}×{height} image on {model.device.type} "
        f"(+ {1000 * result.text_seconds:.0f} ms for the class names' text embeddings, cached for next time)"
    )


def _status(message: str) -> str:
    return f'<div class="status-error">⚠ {html.escape(message)}</div>' if message else ""


# --- examples ---------------------------------------------------------------------------------------------------


def find_examples(paths: Sequence[str | Path]) -> list[Path]:
    """Image files given directly or found (sorted, at most 8 per folder) in the given folders."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:8]
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"example image or folder not found: {item}")
    return found


def synthetic_examples(folder: Path, count: int = 2, size: int = 192) -> list[Path]:
    """A few generated scenes (the quick start's classes) written as PNGs, so the page always has examples."""
    scenes = SyntheticScenes(num_images=count, size=size, seed=20231003, unseen=[])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels, _, name = scenes.load(index)
        path = folder / f"{name}.png"
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


# --- the page ---------------------------------------------------------------------------------------------------

CSS = """
.legend { border-collapse: collapse; font-size: 0.95em; margin-top: 6px; }
.legend, .legend tr, .legend td, .legend th { border: none !important; background: none !important; }
.legend td, .legend th { padding: 2px 12px 2px 0; text-align: left; }
.legend .area { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #333; vertical-align: middle; }
.status-error { color: #b00020; font-weight: 600; padding: 4px 0; }
.warning { color: #8a5300; }
"""


def _result_view(label: str, image_id: str, legend_id: str, time_id: str) -> tuple[Any, Any, Any]:
    """One result on the page: the overlay, its legend and its timing line."""
    image = gr.Image(
        type="pil", format="png", label=label, interactive=False, height=IMAGE_HEIGHT, elem_id=image_id
    )
    return image, gr.HTML(elem_id=legend_id), gr.Markdown(elem_id=time_id)


def build_app(
    model: ZeroShotSegmenter,
    baseline: ZeroShotSegmenter | None = None,
    examples: Sequence[Path] = (),
    default_classes: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    example_dir: Path | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
    text_cache_size: int = DEFAULT_TEXT_CACHE_SIZE,
) -> gr.Blocks:
    """The two-tab page around ``model`` (and ``baseline`` for the comparison tab).

    Example images are ``examples`` plus two generated scenes written to ``example_dir`` (a temporary folder by
    default); the class box starts with the checkpoint's training classes. A request may name at most
    ``max_classes`` classes; ``text_cache_size`` class lists stay embedded in memory (`bound_text_caches`).
    """
    meta = getattr(model, "meta", {})
    default_classes = default_classes or ", ".join(n for n in meta.get("class_names", "").split(",") if n)
    rows = _example_rows(examples, default_classes, example_dir)
    bound_text_caches([model, baseline], text_cache_size)
    page = _Requests(model, baseline, max_pixels, max_classes, text_cache_size)
    header = f"# clipzss: zero-shot segmentation\nServing **{html.escape(describe(model))}**. "
    header += "Type any class names, comma separated: the image is segmented into exactly those classes."
    with gr.Blocks(title="clipzss demo", analytics_enabled=False) as app:
        gr.Markdown(header)
        if _random_teacher(model):
            gr.HTML(
                '<p class="warning">This model was built with a <b>random</b> CLIP (no weights on this machine): '
                "its text embeddings carry no meaning, so the segmentation shows the pipeline, not zero-shot "
                "quality.</p>"
            )
        with gr.Tab("Segment"):
            _segment_tab(page, rows, default_classes)
        with gr.Tab("Compare with a baseline"):
            _compare_tab(page, rows, default_classes)
    return app


def _example_rows(
    examples: Sequence[Path], default_classes: str, example_dir: Path | None
) -> list[list[str]]:
    """The examples' (image, class names) rows: the given images with the default classes, then two generated
    scenes (written to ``example_dir``, a temporary folder by default) with the synthetic classes."""
    generated = synthetic_examples(example_dir or Path(tempfile.mkdtemp(prefix="clipzss-demo-")))
    return [[str(p), default_classes] for p in examples] + [
        [str(p), ", ".join(SYNTHETIC_CLASSES)] for p in generated
    ]


class _Requests:
    """What the page's buttons run: each request checked and bounded, and every failure a message on the page
    (the traceback goes to the server log, never to the browser)."""

    def __init__(
        self,
        model: ZeroShotSegmenter,
        baseline: ZeroShotSegmenter | None,
        max_pixels: int,
        max_classes: int,
        text_cache_size: int,
    ) -> None:
        self.model, self.baseline = model, baseline
        self.max_pixels, self.max_classes, self.text_cache_size = max_pixels, max_classes, text_cache_size
        self.first_recipe = getattr(baseline, "recipe", BASELINES[0])
        # The comparison tab's baselines, one per recipe asked for, all on the student's CLIP.
        self.compared: dict[str, ZeroShotSegmenter] = (
            {self.first_recipe: baseline} if baseline is not None else {}
        )

    def pick_baseline(self, recipe: str) -> ZeroShotSegmenter:
        """The comparison tab's recipe on the student's CLIP, built once per recipe on first use."""
        if recipe not in self.compared:
            built = comparison_baseline(self.model, recipe)
            if built is None:
                raise UsageError(f"no {recipe} baseline: the model's text encoder is not CLIP")
            bound_text_caches([built], self.text_cache_size)
            self.compared[recipe] = built
        return self.compared[recipe]

    def run_one(
        self, target: ZeroShotSegmenter, path: str | None, names_text: str, template: str
    ) -> Segmentation:
        if not path:
            raise UsageError("upload an image or pick an example first")
        names = parse_class_names(names_text or "")
        check_class_count(names, self.max_classes)
        return segment(target, open_bounded(path, self.max_pixels), names, TEMPLATES.get(template))

    def on_segment(self, path: str | None, names_text: str, template: str) -> tuple[Any, str, str, str]:
        """The Segment tab: overlay, legend, timing and status."""
        try:
            result = self.run_one(self.model, path, names_text, template)
        except (ValueError, FileNotFoundError) as err:
            return None, "", "", _status(str(err))
        except Exception:
            logger.exception("the demo failed on %s", path)
            return None, "", "", _status("the model failed on this image (details in the server log)")
        return result.overlay, legend_html(result), timing_text(result, self.model), ""

    def on_compare(self, path: str | None, names_text: str, recipe: str) -> tuple[Any, ...]:
        """The Compare tab: the student's and the baseline's overlay, legend and timing, the baseline's title and
        the status."""
        if self.baseline is None:
            return _compare_failure("no baseline to compare with")
        try:
            other = self.pick_baseline(recipe)
            ours = self.run_one(self.model, path, names_text, "the model's prompt ensemble")
            theirs = self.run_one(other, path, names_text, "the model's prompt ensemble")
        except (ValueError, FileNotFoundError) as err:
            return _compare_failure(str(err))
        except Exception:
            logger.exception("the comparison failed on %s", path)
            return _compare_failure("a model failed on this image (details in the server log)")
        return (
            *_shown(ours, self.model),
            *_shown(theirs, other),
            f"### {html.escape(describe(other))}",
            "",
        )


def _shown(result: Segmentation, model: ZeroShotSegmenter) -> tuple[Any, str, str]:
    """One result's overlay, legend and timing line."""
    return result.overlay, legend_html(result), timing_text(result, model)


def _compare_failure(message: str) -> tuple[Any, ...]:
    """The Compare tab's outputs when a comparison fails: both results empty, the title kept, the message shown."""
    return None, "", "", None, "", "", "", _status(message)


def _segment_tab(page: _Requests, rows: list[list[str]], default_classes: str) -> None:
    """The Segment tab: an image, class names and (for a CLIP text encoder) a prompt template in; a result out."""
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                label="image",
                height=IMAGE_HEIGHT,
                elem_id="input-image",
            )
            classes = gr.Textbox(
                value=default_classes,
                label="class names (comma separated)",
                placeholder="road, car, tree, sky",
                elem_id="classes",
            )
            template = gr.Dropdown(
                list(TEMPLATES),
                value=next(iter(TEMPLATES)),
                label="prompt template",
                visible=isinstance(page.model.text_encoder, CLIPTeacher),
                elem_id="template",
            )
            button = gr.Button("Segment", variant="primary", elem_id="segment")
            status = gr.HTML(elem_id="status")
        with gr.Column():
            result_image, legend, timing = _result_view("overlay", "overlay", "legend", "timing")
    gr.Examples(rows, inputs=[image, classes], label="examples")
    button.click(page.on_segment, [image, classes, template], [result_image, legend, timing, status])
    classes.submit(page.on_segment, [image, classes, template], [result_image, legend, timing, status])


def _compare_tab(page: _Requests, rows: list[list[str]], default_classes: str) -> None:
    """The Compare tab: one image and class names in; the student's result and a baseline's side by side."""
    baseline = page.baseline
    if baseline is None:
        gr.Markdown(
            "The comparison needs a trained student whose text encoder is CLIP: start the demo with "
            "`--checkpoint CKPT` (and `--teacher-weights` when the checkpoint names a hub tag)."
        )
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                type="filepath", image_mode=None, label="image", height=IMAGE_HEIGHT, elem_id="cmp-image"
            )
        with gr.Column():
            classes = gr.Textbox(
                value=default_classes, label="class names (comma separated)", elem_id="cmp-classes"
            )
            recipe = gr.Dropdown(
                list(BASELINES),
                value=page.first_recipe,
                label="training-free baseline (docs/protocols.md)",
                visible=baseline is not None,
                elem_id="cmp-baseline",
            )
            button = gr.Button("Compare", variant="primary", elem_id="compare")
            status = gr.HTML(elem_id="cmp-status")
    with gr.Row():
        with gr.Column():
            gr.Markdown(f"### {html.escape(describe(page.model))}")
            ours = _result_view("student", "ours-image", "ours-legend", "ours-time")
        with gr.Column():
            title = gr.Markdown(
                f"### {html.escape(describe(baseline))}" if baseline is not None else "",
                elem_id="theirs-title",
            )
            theirs = _result_view("baseline", "theirs-image", "theirs-legend", "theirs-time")
    gr.Examples(rows, inputs=[image, classes], label="examples")
    button.click(page.on_compare, [image, classes, recipe], [*ours, *theirs, title, status])


# What the demo never does, whatever Gradio's defaults become: no share link (Gradio's banner suggests
# `share=True`; we print the URL instead), no server-side rendering, MCP server or installable app, no tracebacks in
# the page, no banner (quiet), and no blocking inside `launch` (``block_thread`` below decides).
_NEVER: dict[str, bool] = {
    "share": False,
    "ssr_mode": False,
    "mcp_server": False,
    "pwa": False,
    "show_error": False,
    "quiet": True,
    "prevent_thread_lock": True,
}


def start_failure(host: str, port: int) -> str:
    """What went wrong when Gradio says "Cannot find empty port": it says so both when the port is taken and when
    its server did not start within its fixed 5 s of wall time (a busy machine), and only the first is about ports."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as Gradio checks: TIME_WAIT is not "in use"
        try:
            sock.bind((host, port))
        except OSError:
            return f"port {port} on {host} is in use by another program: choose another port (clipzss demo --port)"
    return (
        f"the demo's web server did not start on {host}:{port} within Gradio's 5 s limit although the port is free "
        "(a busy machine is the usual cause): run the command again"
    )


def launch(
    app: gr.Blocks,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
    block: bool = True,
    quiet: bool = False,
) -> str:
    """Serve ``app``; with ``block=False`` return at once (tests, notebooks) and leave it to ``app.close()``.

    Returns the local URL. Nothing is sent anywhere: no share link, no analytics, no server-side rendering.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "the demo is reachable from the network on %s:%d; anyone who can reach it can use it", host, port
        )
    try:
        _, url, _ = app.launch(
            server_name=host,
            server_port=port,
            max_file_size=max_file_size,
            theme=gr.themes.Default(),
            css=CSS,
            **_NEVER,
        )
    except OSError as err:
        if not str(err).startswith("Cannot find empty port"):
            raise
        raise OSError(start_failure(host, port)) from None
    if not quiet:
        print(f"clipzss demo running on {url} (Ctrl-C stops it)", flush=True)
    if block:
        app.block_thread()
    return url
