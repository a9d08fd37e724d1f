"""A small load test of the demo server on 127.0.0.1: concurrent requests, no errors, bounded memory, bounded uploads."""

from __future__ import annotations

import resource
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
from gradio_client import Client, handle_file

from clipzss.demo import build_app, launch
from clipzss.models.segmenter import Segmenter
from conftest import free_port

pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")

CLASSES = "red horizontal stripes, plain grey, orange noise"


def _rss_mb() -> float:
    """Current resident memory of this process (the server runs in it), from /proc when available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def server(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    segmenter = Segmenter.from_checkpoint(trained_checkpoint, device="cpu")
    folder = tmp_path_factory.mktemp("demo")
    app = build_app(segmenter, None, example_dir=folder / "examples", max_pixels=200_000)
    url = launch(app, port=free_port(), max_file_size="300kb", block=False, quiet=True)
    assert url.startswith("http://127.0.0.1:"), "the demo binds localhost by default"
    yield url, folder
    app.close()


def _image(path: Path, size: int, seed: int) -> Path:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_concurrent_requests_succeed_with_stable_memory(server) -> None:
    url, folder = server
    images = [_image(folder / f"img{i}.png", 96 + 16 * i, i) for i in range(4)]

    def one(i: int) -> tuple[str, str]:
        client = Client(url, verbose=False, download_files=False)
        _overlay, legend, _timing, status = client.predict(
            handle_file(str(images[i % len(images)])),
            CLASSES,
            "the model's prompt ensemble",
            api_name="/on_segment",
        )
        return legend, status

    with ThreadPoolExecutor(4) as pool:  # warm-up round: caches, allocator pools
        list(pool.map(one, range(8)))
    before = _rss_mb()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(32)))
    growth = _rss_mb() - before
    assert all(status == "" for _, status in results), [s for _, s in results if s]
    assert all("plain grey" in legend or "orange noise" in legend or "red" in legend for legend, _ in results)
    assert growth < 150, f"memory grew by {growth:.0f} MB over 32 requests"


def test_oversized_uploads_and_images_are_refused_and_the_server_lives_on(server) -> None:
    url, folder = server
    client = Client(url, verbose=False, download_files=False)
    big_file = folder / "big.png"
    Image.fromarray((np.random.default_rng(0).random((700, 700, 3)) * 255).astype(np.uint8)).save(big_file)
    assert big_file.stat().st_size > 300_000
    with pytest.raises(Exception, match=r"(?i)file size|too large|413|exceed"):
        client.predict(
            handle_file(str(big_file)), CLASSES, "the model's prompt ensemble", api_name="/on_segment"
        )
    wide = folder / "wide.png"
    Image.new("RGB", (1000, 400)).save(wide)  # small file, 400k pixels > the 200k bound
    _, _, _, status = client.predict(
        handle_file(str(wide)), CLASSES, "the model's prompt ensemble", api_name="/on_segment"
    )
    assert "accepts up to 0.2 MP" in status
    ok = _image(folder / "ok.png", 64, 9)
    _, legend, _, status = client.predict(
        handle_file(str(ok)), CLASSES, "the model's prompt ensemble", api_name="/on_segment"
    )
    assert status == "" and legend
