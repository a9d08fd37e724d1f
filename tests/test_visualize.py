"""Colours: every class id keeps the colour its legend row shows, for any vocabulary (`clipzss.visualize`)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from clipzss.visualize import colorize, overlay, palette


def test_colours_match_the_legend_beyond_256_classes() -> None:
    names = [f"class {i}" for i in range(300)]
    mask = np.array([[255, 299], [0, 300]], dtype=np.int64)
    rgb = np.asarray(colorize(mask, len(names)))
    legend = palette(len(names))  # the colours `overlay` draws in its legend
    assert (rgb[0, 1] != rgb[0, 0]).any()
    np.testing.assert_array_equal(rgb[0, 1], legend[299])
    np.testing.assert_array_equal(rgb[0, 0], legend[255])
    np.testing.assert_array_equal(rgb[1, 1], [0, 0, 0])  # beyond the class list: black
    assert (np.asarray(colorize(np.array([[255]]), 3))[0, 0] == 0).all()  # ignore stays black for small lists
    drawn = np.asarray(overlay(Image.new("RGB", (2, 2)), mask.clip(0, 299), names, opacity=1.0))
    np.testing.assert_array_equal(drawn[0, 1], legend[299])
