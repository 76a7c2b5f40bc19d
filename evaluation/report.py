"""Self-contained HTML reports: headings, text, tables, matplotlib figures and image strips in one file.

Everything is embedded (PNG as base64 data URIs, CSS inline): the file opens offline, with no CDN and no
network request. Tables are written beside the HTML as CSV/Parquet when asked.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#1d1d1f;line-height:1.45;padding:0 1em}
h1{font-size:1.7em;margin-bottom:.2em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}h3{font-size:1.1em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right}th{background:#f4f4f6}
td.l,th.l{text-align:left}.meta{color:#666;font-size:.85em}
figure{margin:.8em 0}figcaption{color:#555;font-size:.85em}
.strip{display:flex;flex-wrap:wrap;gap:6px;margin:.4em 0}.strip figure{margin:0;text-align:center}
.strip img{image-rendering:pixelated;border:1px solid #ccc}
.note{background:#f7f7fa;border-left:3px solid #88a;padding:.4em .8em}
"""


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes (and close it)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def image_png(image: np.ndarray, scale: int = 1) -> bytes:
    """Encode an image (uint8 ``[H, W, 3]`` or float in [0, 1]) as PNG bytes, optionally upscaled."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise ValueError("image_png got an image with NaN/Inf values; clean it before adding it to a report.")
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def json_safe(obj: Any) -> Any:
    """Replace NaN/Inf by None and numpy scalars/arrays by Python values, recursively (for JSON sidecars)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class Report:
    """Build a self-contained HTML report.

    Parameters
    ----------
    title
        Page title (first heading).
    meta
        Key/value pairs shown under the title (seed, versions, ...); torch/python versions and the date
        are added automatically.

    Examples
    --------
    >>> import pandas as pd
    >>> r = Report("demo", meta={"seed": 0})
    >>> r.heading("Numbers").table(pd.DataFrame({"a": [1, 2]}))  # doctest: +ELLIPSIS
    <evaluation.report.Report object at ...>
    >>> "<table" in r.to_html()
    True
    """

    def __init__(self, title: str, meta: dict[str, Any] | None = None) -> None:
        import torch

        self.title = title
        self.meta = {
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            **(meta or {}),
        }
        self._parts: list[str] = []
        self._tables: dict[str, pd.DataFrame] = {}

    # ----------------------------------------------------------------- content
    def heading(self, text: str, level: int = 2, anchor: str | None = None) -> Report:
        """Add a heading (``level`` 2 or 3)."""
        ident = f' id="{html.escape(anchor)}"' if anchor else ""
        self._parts.append(f"<h{level}{ident}>{html.escape(text)}</h{level}>")
        return self

    def text(self, text: str, note: bool = False) -> Report:
        """Add a paragraph of plain text (escaped)."""
        cls = ' class="note"' if note else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def table(self, df: pd.DataFrame, name: str | None = None, max_rows: int = 50, float_format: str = "{:.3g}") -> Report:
        """Add a DataFrame as an HTML table; ``name`` also saves it as a sidecar CSV/Parquet."""
        if name:
            self._tables[name] = df
        shown = df.head(max_rows)
        cols = list(shown.columns)
        head = "".join(f'<th class="l">{html.escape(str(c))}</th>' if shown[c].dtype == object else
                       f"<th>{html.escape(str(c))}</th>" for c in cols)
        rows = []
        for _, row in shown.iterrows():
            cells = []
            for c in cols:
                v = row[c]
                if isinstance(v, (float, np.floating)):
                    cells.append(f"<td>{'' if not np.isfinite(v) else float_format.format(v)}</td>")
                elif isinstance(v, (int, np.integer, bool, np.bool_)):
                    cells.append(f"<td>{v}</td>")
                else:
                    cells.append(f'<td class="l">{html.escape(str(v))}</td>')
            rows.append("<tr>" + "".join(cells) + "</tr>")
        more = f'<p class="meta">showing {max_rows} of {len(df)} rows</p>' if len(df) > max_rows else ""
        self._parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}")
        return self

    def figure(self, fig, caption: str | None = None) -> Report:
        """Embed a matplotlib figure (closed afterwards)."""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(f'<figure><img alt="{html.escape(caption or "figure")}" '
                           f'src="{png_data_uri(figure_png(fig))}">{cap}</figure>')
        return self

    def images(self, images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str] | None = None,
               scale: int = 2, title: str | None = None) -> Report:
        """Embed a strip of images with optional captions."""
        captions = list(captions) if captions is not None else [""] * len(images)
        if len(captions) != len(images):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions; pass one caption per image.")
        items = "".join(
            f'<figure><img alt="{html.escape(c)}" src="{png_data_uri(image_png(im, scale))}">'
            f"<figcaption>{html.escape(c)}</figcaption></figure>"
            for im, c in zip(images, captions)
        )
        t = f"<h3>{html.escape(title)}</h3>" if title else ""
        self._parts.append(f'{t}<div class="strip">{items}</div>')
        return self

    def raw_html(self, fragment: str) -> Report:
        """Add a trusted HTML fragment as is."""
        self._parts.append(fragment)
        return self

    # ----------------------------------------------------------------- output
    def to_html(self) -> str:
        meta = " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in self.meta.items())
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1><p class=\"meta\">{meta}</p>"
            + "\n".join(self._parts)
            + "</body></html>\n"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, folder: str | Path, name: str = "index.html", tables: str = "parquet") -> Path:
        """Write ``folder/name`` plus each named table as ``folder/<table>.parquet`` (or ``.csv``) and
        ``folder/summary.json`` with the metadata. Returns the HTML path."""
        if tables not in ("parquet", "csv"):
            raise ValueError(f"tables must be 'parquet' or 'csv', got {tables!r}.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(self.to_html(), encoding="utf-8")
        for tname, df in self._tables.items():
            if tables == "parquet":
                df.to_parquet(folder / f"{tname}.parquet", index=False)
            df.to_csv(folder / f"{tname}.csv", index=False)
        (folder / "summary.json").write_text(json.dumps(json_safe({"title": self.title, **self.meta}), indent=2))
        return path
