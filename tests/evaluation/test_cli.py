"""The conceptkit command: the demo runs end to end and its numbers reflect the ground truth; errors exit
non-zero with a one-line reason."""
from __future__ import annotations

import numpy as np
import pandas as pd

from evaluation.cli import main
from evaluation.demo import probe_concepts


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--n", "160", "--out", str(out), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "ConceptWorld" in html
    by_family = pd.read_parquet(out / "probe_by_family.parquet")
    emb = by_family[by_family["layer"] == "image embedding"].set_index("family")
    # the built-in CLIP encodes colours and backgrounds linearly: the probe must beat the majority rate
    for fam in ("colour", "background", "shape"):
        assert emb.loc[fam, "accuracy"] > emb.loc[fam, "majority"] + 0.15
    assert (out / "activations" / "index.json").exists()


def test_probe_concepts_detects_absence_of_signal():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.5
    informative = y[:, None] + rng.normal(0, 0.3, (400, 3))
    noise = rng.normal(size=(400, 3))
    df = pd.DataFrame({"c": y})
    assert probe_concepts(informative, df).loc[0, "auroc"] > 0.95
    assert abs(probe_concepts(noise, df).loc[0, "auroc"] - 0.5) < 0.15


def test_world_command_writes_folder(tmp_path):
    from concepts.world import load_folder

    assert main(["world", "--n", "5", "--out", str(tmp_path / "w"), "--format", "csv", "--quiet"]) == 0
    assert len(load_folder(tmp_path / "w")) == 5


def test_errors_exit_nonzero_with_reason(tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "x.txt").write_text("x")
    assert main(["world", "--n", "5", "--out", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err
    assert main(["demo", "--n", "10", "--out", str(tmp_path / "d")]) == 1
    assert "at least 64 images" in capsys.readouterr().err
    assert main([]) == 2
