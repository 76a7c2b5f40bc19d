"""Strategic cluster graph, importance plots and the report section (evaluation.cluster_graph / importance_report)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from evaluation.cluster_graph import (
    cluster_assignments,
    cluster_graph,
    concept_proximity,
    embed_importances,
    fidelity_bars,
)
from evaluation.decomposition import ConceptState
from evaluation.importance_report import add_importance_section
from evaluation.report import Report


def _strategies(seed: int = 0) -> np.ndarray:
    """Three groups of images, each dominated by a different concept (a: 30 images, b: 20, c: 4)."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(scale=0.1, size=(54, 4))
    phi[:30, 0] += 2.0
    phi[30:50, 1] += 2.0
    phi[50:, 2] += 2.0
    return phi


def test_cluster_assignments_count_strategies() -> None:
    tab = cluster_assignments(_strategies(), ["a", "b", "c", "d"], min_count=10)
    assert tab.values.tolist() == [["a", 30, True], ["b", 20, True], ["c", 4, False], ["d", 0, False]]


def test_cluster_graph_colours_only_strategies() -> None:
    ax = cluster_graph(_strategies(), ["a", "b", "c", "d"], min_count=10, embedding="tsne", random_state=0)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["other (4)", "a (30)", "b (20)"]
    assert ax.get_title() == "Strategic cluster graph (tsne)"
    # the two strategies form separate clusters in the embedding
    coords = np.vstack([c.get_offsets() for c in ax.collections])
    assert coords.shape == (54, 2)
    plt.close("all")
    coords, used = embed_importances(_strategies(), embedding="pca")
    a, b = coords[:30].mean(0), coords[30:50].mean(0)
    spread = max(coords[:30].std(0).max(), coords[30:50].std(0).max())
    assert used == "pca" and np.linalg.norm(a - b) > 5 * spread


def test_embedding_fallbacks_and_errors() -> None:
    try:
        import umap  # noqa: F401
        has_umap = True
    except ImportError:
        has_umap = False
    _, used = embed_importances(_strategies(), embedding="auto")
    assert used == ("umap" if has_umap else "tsne")
    if not has_umap:
        with pytest.raises(ImportError, match="umap-learn"):
            embed_importances(_strategies(), embedding="umap")
    assert embed_importances(np.ones((3, 2)), embedding="tsne")[1] == "pca"  # too few points for t-SNE
    with pytest.raises(ValueError, match="embedding must be"):
        embed_importances(_strategies(), embedding="mds")
    with pytest.raises(ValueError, match="non-empty"):
        cluster_graph(np.zeros((0, 3)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 concept names"):
        cluster_graph(_strategies(), ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        cluster_assignments(np.array([[np.nan, 1.0]]), ["a", "b"])


def test_fidelity_bars_and_proximity() -> None:
    t = pd.DataFrame({"c_deletion": [0.1, 0.5], "c_insertion": [0.9, 0.2], "c_mufidelity": [1.0, 0.0]},
                     index=["gxi", "random"])
    ax = fidelity_bars(t)
    heights = [p.get_height() for p in ax.patches]
    assert heights == [0.1, 0.9, 1.0, 0.5, 0.2, 0.0]
    with pytest.raises(ValueError, match="lacks metric columns"):
        fidelity_bars(t, metrics=["aopc"])
    with pytest.raises(TypeError, match="DataFrame"):
        fidelity_bars(t.to_numpy())
    ax = concept_proximity(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), ["a", "a2", "b"])
    S = ax.images[0].get_array()
    assert np.allclose(S, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="2 names for 3"):
        concept_proximity(np.eye(3), ["a", "b"])
    plt.close("all")


def test_report_section_from_tables() -> None:
    from evaluation.importance import global_importance

    glob = global_importance(_strategies(), ["a", "b", "c", "d"], classes=[0] * 30 + [1] * 24,
                             class_names=["cat", "dog"])
    pix = pd.DataFrame({"n": [10], "pointing_game": [0.9], "mass_in_mask": [0.6], "mask_area": [0.05],
                        "lift": [12.0]}, index=pd.Index(["colour"], name="family"))
    r = add_importance_section(Report("audit"), global_table=glob, pixel_summary=pix)
    html = r.to_html()
    assert "Most important concepts per class" in html and "cat" in html and "a (" in html
    assert "Are concepts read from the right pixels?" in html and "0.9" in html
    with pytest.raises(ValueError, match="nothing to report"):
        add_importance_section(Report("x"))
    with pytest.raises(TypeError, match="Report"):
        add_importance_section("report", global_table=glob)


def test_concept_state_select() -> None:
    st = ConceptState(torch.arange(8.0).reshape(4, 1, 2), 4, torch.arange(4.0)[:, None],
                      {"inputs": torch.arange(4), "prompts": ["a", "b", "c", "d"], "layout": {"x": 1}})
    sub = st.select(torch.tensor([True, False, True, False]))
    assert sub.n == 2 and sub.u[:, 0, 0].tolist() == [0.0, 4.0]
    assert sub.data["prompts"] == ["a", "c"] and sub.data["layout"] == {"x": 1}
    assert st.select(slice(1, 3)).data["inputs"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="at least one row"):
        st.select([])
