"""Notebook ergonomics: rich HTML views of results, and plotting helpers that draw on a given ``ax``.

SAEs, concept banks, CBM heads, reports and importance comparisons have their ``_repr_html_`` tested beside
their code; this file covers the views added for the blindspot and erasure results, and checks that every
public plotting helper of the packages accepts ``ax=`` and draws on it.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from evaluation.blindspots import BlindspotAnalysis, compare_energies, compare_generators  # noqa: E402
from evaluation.erasure.metrics import ErasureResult, SweepResult  # noqa: E402


class _TableParser(HTMLParser):
    """The cell texts of every <table> in an HTML fragment (stdlib only: pandas.read_html needs lxml)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):  # noqa: ANN001
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):  # noqa: ANN001
        if self._cell is not None:
            self._cell.append(data)


def read_tables(html: str, index_col: int | None = None) -> list[pd.DataFrame]:
    parser = _TableParser()
    parser.feed(html)
    out = []
    for rows in parser.tables:
        header, body = rows[0], [r for r in rows[1:] if r]
        if body and body[0][0] and not any(body[0][1:]):  # the index name, on a header row of its own
            body = body[1:]
        if body and len(header) < len(body[0]):  # pandas writes the index name on a row of its own
            header = [""] * (len(body[0]) - len(header)) + header
        df = pd.DataFrame(body, columns=header)
        for col in df.columns:
            try:
                df[col] = pd.to_numeric(df[col])
            except (TypeError, ValueError):
                pass
        out.append(df.set_index(df.columns[index_col]) if index_col is not None else df)
    return out


@pytest.fixture(scope="module")
def planted_results():
    """Unit 1 suppressed 20x and unit 3 exaggerated 8x in 'gen'; 'null' is an independent sample."""
    rng = np.random.default_rng(0)
    real = rng.exponential(1.0, (300, 4))
    gen = real[rng.permutation(300)] * np.array([1.0, 0.05, 1.0, 8.0])
    null = rng.exponential(1.0, (300, 4))
    names = ["plain", "<b>red</b>", "circle", "dots"]
    return {
        "gen": compare_energies(real, gen, names=names, n_bootstrap=100, seed=0, progress=False),
        "null": compare_energies(real, null, names=names, n_bootstrap=100, seed=0, progress=False),
    }


def test_blindspot_result_html_lists_the_flagged_concepts_escaped(planted_results):
    res = planted_results["gen"]
    html = res._repr_html_()
    assert html.startswith("<div>") and "BlindspotResult" in html and "300 caption pairs" in html
    assert "suppressed: 1" in html and "exaggerated: 1" in html and "aligned: 2" in html
    assert "&lt;b&gt;red&lt;/b&gt;" in html and "<b>red</b>" not in html  # names are escaped
    table = read_tables(html)[0]
    assert table["status"].tolist() == ["suppressed", "exaggerated"]  # most extreme delta first
    assert table["name"].tolist() == ["<b>red</b>", "dots"]
    null_html = planted_results["null"]._repr_html_()
    assert "No concept is flagged" in null_html and "<table" not in null_html
    assert "more flagged concepts" in res._repr_html_(max_rows=1)


def test_blindspot_analysis_html_has_one_row_per_generator(planted_results):
    results = planted_results
    analysis = BlindspotAnalysis(results=dict(results), cross=compare_generators(results), coder=None,
                                 real_images=np.zeros((300, 4, 4, 3), np.uint8), captions=["x"] * 300,
                                 seeds=list(range(300)), generated={}, records={}, real_energy=None)
    html = analysis._repr_html_()
    summary = read_tables(html, index_col=0)[0]
    assert list(summary.index) == ["gen", "null"]
    assert summary.loc["gen", "suppressed"] == 1 and summary.loc["null", "suppressed"] == 0
    assert "Across generators" in html


def _erasure_result(erased_rate: float, concept: str = "red") -> ErasureResult:
    rows = []
    for model, rate in (("original", 1.0), ("erased", erased_rate)):
        for i in range(4):
            rows.append({"set": "target", "prompt_id": i, "prompt": f"a {concept} circle", "seed": i, "model": model,
                         "target_score": rate, "target_detected": float(i < 4 * rate)})
    return ErasureResult(frame=pd.DataFrame(rows), concept=concept, meta={"strength": 1.0})


def test_erasure_views_show_the_summary_numbers():
    res = _erasure_result(0.25, concept="<red>")
    table = read_tables(res._repr_html_())[0].set_index("metric")
    assert table.loc["target_detection", "original"] == 1.0 and table.loc["target_detection", "erased"] == 0.25
    assert "&lt;red&gt;" in res._repr_html_()
    sweep = SweepResult(strengths=[0.0, 1.0], results=[_erasure_result(1.0), _erasure_result(0.0)])
    table = read_tables(sweep._repr_html_())[0]
    assert table["strength"].tolist() == [0.0, 1.0] and table["target_detection"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------ plotting
PLOT_NAME = ("plot", "sheet", "cluster_graph", "fidelity_bars", "concept_proximity")


def _public_plotters():
    found = {}
    for package in ("concepts", "sae", "cbm", "evaluation"):
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            if ".train_" in info.name or info.name.split(".")[-1].startswith("_"):
                continue
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                members = [(f"{info.name}.{name}", obj)]
                if inspect.isclass(obj):
                    members = [(f"{info.name}.{name}.{m}", f) for m, f in vars(obj).items()
                               if not m.startswith("_") and inspect.isfunction(f)]
                for qual, fn in members:
                    if inspect.isfunction(fn) and qual.rsplit(".", 1)[-1].startswith(PLOT_NAME):
                        found[qual] = fn
    return found


def test_every_plotting_helper_takes_ax():
    plotters = _public_plotters()
    assert {"evaluation.cluster_graph.cluster_graph", "evaluation.blindspots_report.plot_delta_histogram",
            "evaluation.erasure.metrics.SweepResult.plot"} <= set(plotters)
    missing = [q for q, fn in plotters.items() if "ax" not in inspect.signature(fn).parameters]
    assert missing == [], f"plotting helpers without an ax= parameter: {missing}"


def test_plotting_helpers_draw_on_the_given_axes(planted_results):
    from evaluation.blindspots_report import plot_cross_generator, plot_delta_histogram
    from evaluation.cluster_graph import concept_proximity, fidelity_bars

    fig, axes = plt.subplots(2, 3)
    try:
        assert plot_delta_histogram(planted_results["gen"], ax=axes[0, 0]) is axes[0, 0]
        assert plot_cross_generator(planted_results, "gen", "null", ax=axes[0, 1]) is axes[0, 1]
        t = pd.DataFrame({"c_deletion": [0.1, 0.5], "c_mufidelity": [1.0, 0.0]}, index=["gxi", "random"])
        assert fidelity_bars(t, ax=axes[0, 2]) is axes[0, 2]
        assert concept_proximity(np.eye(3), ["a", "b", "c"], ax=axes[1, 0]) is axes[1, 0]
        sweep = SweepResult(strengths=[0.0, 1.0], results=[_erasure_result(1.0), _erasure_result(0.0)])
        assert sweep.plot(utility="target_detection", ax=axes[1, 1]) is axes[1, 1]
        for ax in (axes[0, 0], axes[0, 2], axes[1, 1]):
            assert ax.has_data()
        assert len(plt.get_fignums()) == 1  # nothing drew on a new figure
    finally:
        plt.close("all")
