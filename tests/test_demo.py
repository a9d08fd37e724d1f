"""The web demo: its logic directly, and the real page driven in a headless chromium with Playwright.

The browser test uses the system's chromium (Debian's package, which .ci/run installs) and never downloads one; it
skips with the reason when no chromium is found, unless CLIPZSS_REQUIRE_BROWSER=1 (set by .ci/run) makes that a
failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

from clipzss.cli import main
from clipzss.demo import (
    build_app,
    comparison_baseline,
    launch,
    legend_html,
    open_bounded,
    segment,
)
from clipzss.models.recipes import baseline_eval_config
from clipzss.models.segmenter import (
    LRUCache,
    MaskCLIPSegmenter,
    PrecomputedText,
    Segmenter,
    TrainingFreeSegmenter,
)
from conftest import free_port, photo

pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # pandas deprecations inside gradio

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def segmenter(trained_checkpoint: Path) -> Segmenter:
    return Segmenter.from_checkpoint(trained_checkpoint, device="cpu")


def _photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_segment_returns_overlay_areas_and_times(segmenter: Segmenter, tmp_path: Path) -> None:
    image = open_bounded(_photo(tmp_path / "a.png", 72, 48), max_pixels=10_000)
    result = segment(segmenter, image, ["road", "<b>sky</b>"], templates=("a photo of a {}.",))
    assert result.overlay.size == (72, 48)
    assert sum(result.areas) == pytest.approx(1.0)
    assert result.image_seconds > 0 and result.text_seconds >= 0
    expected = segmenter.predict(image, ["road", "<b>sky</b>"], templates=("a photo of a {}.",))
    assert result.areas[0] == pytest.approx(float((expected == 0).mean()))
    legend = legend_html(result)
    assert "&lt;b&gt;sky&lt;/b&gt;" in legend and "<b>sky" not in legend  # user text is escaped


def test_images_over_the_pixel_limit_are_refused_from_the_header(tmp_path: Path) -> None:
    path = _photo(tmp_path / "big.png", 200, 100)
    with pytest.raises(ValueError, match=r"200×100 \(0.0 MP\); this demo accepts up to"):
        open_bounded(path, max_pixels=19_999)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read the uploaded file as an image"):
        open_bounded(tmp_path / "junk.png", max_pixels=10**6)


def test_demo_command_checks_its_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 2
    assert "exactly one of --checkpoint CKPT or --baseline maskclip" in capsys.readouterr().err
    assert main(["demo", "--checkpoint", str(tmp_path / "missing" / "run")]) == 2
    assert "no saved model folder" in capsys.readouterr().err


# --- the real browser --------------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    """$CLIPZSS_CHROMIUM, or a chromium on PATH, or Debian's binary."""
    candidates = [os.environ.get("CLIPZSS_CHROMIUM")]
    candidates += [shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")]
    candidates.append("/usr/lib/chromium/chromium")
    return next((c for c in candidates if c and Path(c).is_file()), None)


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[object]:
    chromium = find_chromium()
    if chromium is None:
        reason = "no chromium found (install Debian's package: apt-get install chromium; .ci/run does)"
        if os.environ.get("CLIPZSS_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a new, empty user-data-dir
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_demo_in_a_real_browser(
    segmenter: Segmenter, browser_page: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Gradio gives its server 5 s of wall time to start and then reports "cannot find empty port": a loaded 2-core
    # CI machine can take longer, so its clock runs 12x slower here (60 s), and the test never depends on the load.
    import time
    from types import SimpleNamespace

    import gradio.http_server

    monkeypatch.setattr(
        gradio.http_server, "time", SimpleNamespace(time=lambda: time.monotonic() / 12, sleep=time.sleep)
    )
    page = browser_page
    upload = _photo(tmp_path / "upload.png", 96, 64, seed=1)
    app = build_app(segmenter, comparison_baseline(segmenter), example_dir=tmp_path / "examples")
    url = launch(app, port=free_port(), block=False, quiet=True)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto(url, wait_until="networkidle", timeout=60_000)
        # "networkidle" can come before Gradio's front end has rendered (a loaded CI machine showed "Loading..."):
        # wait for the page's own content rather than for the network.
        page.locator("#classes textarea").wait_for(timeout=60_000)
        assert "clipzss: zero-shot segmentation" in page.inner_text("body")
        # The class box starts with the checkpoint's training classes.
        assert "plain grey" in page.locator("#classes textarea").input_value()

        page.locator("#input-image input[type=file]").set_input_files(str(upload))
        page.locator("#classes textarea").fill("road, sky, car")
        page.locator("#segment").click()
        overlay = page.locator("#overlay img")
        overlay.wait_for(timeout=60_000)
        page.wait_for_function("document.querySelector('#overlay img').naturalWidth > 0", timeout=30_000)
        size = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert size == [96, 64]  # the overlay has the uploaded image's size
        legend = page.locator("#legend").inner_text()
        assert all(name in legend for name in ("road", "sky", "car")) and "%" in legend
        assert " ms" in page.locator("#timing").inner_text()
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)  # kept as the test's artifact

        # Bad input: a visible one-line message, no stack trace.
        page.locator("#classes textarea").fill("road, road")
        page.locator("#segment").click()
        page.locator("#status .status-error").wait_for(timeout=30_000)
        message = page.locator("#status").inner_text()
        assert "duplicate class names: road" in message and "Traceback" not in page.inner_text("body")

        # The comparison tab: student and MaskCLIP side by side, each with its time.
        page.get_by_role("tab", name="Compare with a baseline").click()
        page.locator("#cmp-image input[type=file]").set_input_files(str(upload))
        page.locator("#cmp-classes textarea").fill("road, car")
        page.locator("#compare").click()
        page.locator("#theirs-image img").wait_for(timeout=60_000)
        assert page.locator("#ours-image img").count() == 1
        assert (
            " ms" in page.locator("#ours-time").inner_text()
            and " ms" in page.locator("#theirs-time").inner_text()
        )
        assert "car" in page.locator("#theirs-legend").inner_text()
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
    finally:
        app.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    outside = [u for u in requests if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]
    assert outside == [], f"the page fetched from outside this machine: {outside[:3]}"


def test_comparison_baseline_reuses_the_students_clip(segmenter: Segmenter) -> None:
    baseline = comparison_baseline(segmenter)
    assert isinstance(baseline, MaskCLIPSegmenter) and baseline.teacher is segmenter.text_encoder
    assert baseline.eval_cfg is segmenter.eval_cfg  # same inference settings, a fair comparison
    text_only = PrecomputedText.from_teacher(segmenter.text_encoder, ["road", "car"])
    student_only = Segmenter(segmenter.student, text_only, segmenter.config, "cpu")
    assert comparison_baseline(student_only) is None  # no CLIP image encoder to compare with


@pytest.mark.parametrize("recipe", ["clearclip", "sclip", "naclip"])
def test_comparison_tab_picks_a_recipe(segmenter: Segmenter, tmp_path: Path, recipe: str) -> None:
    import gradio as gr

    app = build_app(segmenter, comparison_baseline(segmenter), example_dir=tmp_path / "examples")
    pickers = [b for b in app.blocks.values() if isinstance(b, gr.Dropdown) and b.elem_id == "cmp-baseline"]
    assert [choice[0] for choice in pickers[0].choices] == ["maskclip", "clearclip", "sclip", "naclip"]
    on_compare = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "on_compare")
    photo = str(_photo(tmp_path / "c.png", 40, 30))
    *results, title, status = on_compare(photo, "road, car", recipe)
    assert status == "" and results[3].size == (40, 30), status
    assert TrainingFreeSegmenter(segmenter.text_encoder, recipe=recipe).title in title
    baseline = comparison_baseline(segmenter, recipe)
    assert baseline.recipe == recipe and baseline.teacher is segmenter.text_encoder
    assert baseline.eval_cfg == baseline_eval_config(
        recipe, segmenter.eval_cfg
    )  # the recipe's input handling
    assert baseline.eval_cfg.label_candidates == segmenter.eval_cfg.label_candidates
    *_, status = on_compare(photo, "road, car", "gem")  # not offered by the page: one line, no traceback
    assert "baseline=&#x27;gem&#x27; is not one of maskclip, clearclip, sclip, naclip" in status


def test_baseline_only_page_builds_without_a_comparison(segmenter: Segmenter, tmp_path: Path) -> None:
    import gradio as gr

    baseline = MaskCLIPSegmenter(segmenter.text_encoder)
    app = build_app(baseline, None, example_dir=tmp_path / "examples")
    assert isinstance(app, gr.Blocks)
    texts = [getattr(block, "value", "") for block in app.blocks.values()]
    assert any("MaskCLIP baseline" in str(t) for t in texts)
    assert any("The comparison needs a trained student" in str(t) for t in texts)
    image = open_bounded(_photo(tmp_path / "b.png", 40, 30), max_pixels=10_000)
    assert segment(baseline, image, ["road", "car"]).overlay.size == (40, 30)


@pytest.mark.usefixtures("user_cache")
def test_demo_bounds_names_per_request_and_its_text_cache(trained_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    from clipzss.demo import build_app

    seg = Segmenter.from_checkpoint(trained_checkpoint, device="cpu")
    app = build_app(seg, None, example_dir=tmp_path / "examples", max_classes=256, text_cache_size=2)
    on_segment = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "on_segment")
    image = str(photo(tmp_path / "a.png", 0))
    *_, status = on_segment(image, ",".join(f"class {i}" for i in range(300)), "the model's prompt ensemble")
    assert "300 class names given; this demo accepts at most 256 per request" in status
    for i in range(5):
        result, _, _, status = on_segment(image, f"road,sky{i}", "the model's prompt ensemble")
        assert result is not None and status == ""
    assert isinstance(seg._text_cache, LRUCache) and len(seg._text_cache) == 2
    assert len(seg.text_encoder._text_cache) == 2  # the CLIP teacher's own copies too
    assert list(seg._text_cache)[-1][0] == ("road", "sky4")  # the most recent list is kept


def test_a_server_that_does_not_start_is_not_blamed_on_the_port() -> None:
    """Gradio reports "Cannot find empty port" both for a taken port and for a server slower than its 5 s start
    limit; the demo tells the two apart, so a busy machine does not send the user hunting for a free port."""
    import socket

    class SlowStart:
        def launch(self, **_: object) -> None:
            raise OSError("Cannot find empty port in range: 1-1. You can specify a different port ...")

    port = free_port()
    with pytest.raises(
        OSError, match=rf"did not start on 127.0.0.1:{port} within Gradio's 5 s.*port is free"
    ):
        launch(SlowStart(), port=port, block=False, quiet=True)  # type: ignore[arg-type]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"^port {busy} on 127.0.0.1 is in use by another program"):
            launch(SlowStart(), port=busy, block=False, quiet=True)  # type: ignore[arg-type]
