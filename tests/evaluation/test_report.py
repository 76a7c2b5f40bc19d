"""The HTML report is one self-contained file: no external resources, embedded images, escaped text."""
from __future__ import annotations

import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from evaluation.report import Report, image_png, json_safe


def test_report_is_self_contained(tmp_path):
    r = Report("t <1>", meta={"seed": 3})
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    r.heading("Plots").figure(fig, caption="a line").text("x < y & z")
    img = np.zeros((4, 4, 3), np.uint8)
    img[0, 0] = (255, 0, 0)
    r.images([img, img], ["a", "b"], scale=2)
    r.table(pd.DataFrame({"name": ["red"], "value": [np.nan], "n": [3]}), name="scores")
    path = r.save(tmp_path)
    html = path.read_text()
    assert html.count("data:image/png;base64,") == 3
    assert not re.search(r"(src|href)=\"https?://", html)
    assert "t &lt;1&gt;" in html and "x &lt; y &amp; z" in html
    assert (tmp_path / "scores.parquet").exists() and (tmp_path / "scores.csv").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed"] == 3


def test_image_png_round_trip_and_errors():
    from io import BytesIO

    from PIL import Image

    img = np.random.default_rng(0).random((5, 6, 3))
    back = np.asarray(Image.open(BytesIO(image_png(img))))
    np.testing.assert_array_equal(back, (img * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="NaN/Inf"):
        image_png(np.full((2, 2, 3), np.nan))
    with pytest.raises(ValueError, match="one caption per image"):
        Report("x").images([img], ["a", "b"])


def test_json_safe_replaces_non_finite():
    out = json_safe({"a": np.float32(np.inf), "b": [np.nan, 1.0], "c": np.arange(2)})
    assert out == {"a": None, "b": [None, 1.0], "c": [0, 1]}
    json.dumps(out, allow_nan=False)
