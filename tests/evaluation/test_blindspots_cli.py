"""``conceptkit blindspots``: a tiny end-to-end run, config files, failures, the built-in default run (slow) and
the report in a real headless browser (slow)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from evaluation.blindspots_job import load_generated_folder, parse_world_spec, resolve_options
from evaluation.cli import main

TINY = ["--n", "160", "--n-concepts", "48", "--top-k", "4", "--sae-epochs", "6", "--n-bootstrap", "100", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny CLI run with a planted-bias world generator and a config file (flags override it)."""
    tmp = tmp_path_factory.mktemp("bs")
    cfg = tmp / "cfg.json"
    cfg.write_text(json.dumps({"seed": 1, "n": 5000, "min-support": 8, "generator": ["world"]}))
    out = tmp / "report"
    code = main(["blindspots", "--config", str(cfg), "--generator", "world:suppress=red,stripes", "--out", str(out),
                 *TINY])
    return code, out


def test_tiny_cli_run_writes_report_and_tables(tiny_run):
    code, out = tiny_run
    assert code == 0
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # self-contained: no remote resources
    concepts = pd.read_parquet(out / "blindspots_concepts.parquet")
    assert set(concepts["generator"]) == {"world:suppress=red,stripes"}  # the flag replaced the config's generator
    assert {"delta", "delta_ci_low", "q_value", "status", "name"} <= set(concepts.columns)
    assert pd.read_csv(out / "blindspots_pairs.csv").shape[0] == 160  # --n 160 overrides the config's 5000
    meta = json.loads((out / "summary.json").read_text())
    assert meta["seed"] == 1  # from the config file
    summary = json.loads((out / "blindspots_summary.json").read_text())["world:suppress=red,stripes"]
    assert summary["suppressed"] >= 1 and summary["exaggerated"] == 0
    flagged = concepts[concepts["status"] == "suppressed"]
    assert f'data-unit="{int(flagged["concept"].iloc[0])}"' in html
    # every flagged unit that maps to a ConceptWorld concept maps to a red or a stripes concept
    agree = pd.read_parquet(out / "blindspots_agreement_world-suppress-red-stripes.parquet")
    hit = agree[agree["unit_status"] == "suppressed"]
    assert len(hit) >= 1 and hit["truth"].map(lambda t: "red" in t or t == "stripes").all()


def test_cli_failures_exit_nonzero_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_pairs": 3}))
    assert main(["blindspots", "--config", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown option(s) ['n_pairs']" in err
    nowhere = str(tmp_path / "nowhere")
    assert main(["blindspots", "--generator", nowhere, "--n", "30", "--out", str(tmp_path / "o")]) == 1
    assert "Could not load" in capsys.readouterr().err
    assert main(["blindspots", "--n", "5", "--generator", "world", "--out", str(tmp_path / "o")]) == 1
    assert "at least 20" in capsys.readouterr().err
    assert main(["blindspots", "--real", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notjson.json").write_text("{")
    assert main(["blindspots", "--config", str(tmp_path / "notjson.json")]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["blindspots", "--generator", "world:hide=red", "--n", "30"]) == 1
    assert "suppress=CONCEPT" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["blindspots", "--help"])
    text = capsys.readouterr().out
    for opt in ("--real", "--generator", "--generated", "--encoder", "--sae", "--n", "--seed", "--device", "--out",
                "--offline", "--config", "--layer", "--tokens", "--pooling", "--fdr", "--lambda-min", "--lambda-max"):
        assert opt in text


def test_options_precedence_and_world_specs():
    assert resolve_options({"n": 50, "generator": "world"})["generator"] == ["world"]
    assert resolve_options({})["n"] == 1000
    assert parse_world_spec("world:exaggerate=dots@0.5;suppress=red") == {"exaggerate": {"dots": 0.5},
                                                                           "suppress": {"red": 1.0}}
    with pytest.raises(ValueError, match="is not a number"):
        parse_world_spec("world:suppress=red@x")


def test_generated_folder_is_paired_by_id(tmp_path):
    from concepts.world import ConceptWorld, save_folder

    batch = ConceptWorld(seed=0, image_size=32).sample(6, seed=0)
    save_folder(batch, tmp_path / "gen", fmt="csv")
    real_table = pd.DataFrame({"id": ["000004", "000001"]})
    imgs = load_generated_folder(tmp_path / "gen", real_table)
    assert (imgs[0] == batch.images[4]).all() and (imgs[1] == batch.images[1]).all()
    with pytest.raises(ValueError, match="no generated image for 1 of 2"):
        load_generated_folder(tmp_path / "gen", pd.DataFrame({"id": ["000004", "999999"]}))


def test_real_and_generated_folders_end_to_end(tmp_path):
    """--real + --generated: a ConceptWorld folder and a planted-bias generated folder paired by id."""
    from concepts.world import ConceptWorld, save_folder
    from evaluation.blindspots_world import WorldGenerator

    batch = ConceptWorld(seed=2, image_size=32).sample(120, seed=3)
    save_folder(batch, tmp_path / "real")
    out = WorldGenerator(suppress={"stripes": 1.0}).generate(batch.captions, list(range(120)))
    gen_dir = tmp_path / "no-stripes"
    (gen_dir / "images").mkdir(parents=True)
    from PIL import Image

    for i, im in enumerate(out.images.numpy()):
        Image.fromarray((im * 255).round().astype("uint8")).save(gen_dir / "images" / f"{i:06d}.png")
    pd.DataFrame({"id": [f"{i:06d}" for i in range(120)], "file": [f"images/{i:06d}.png" for i in range(120)],
                  "caption": batch.captions}).to_csv(gen_dir / "labels.csv", index=False)
    code = main(["blindspots", "--real", str(tmp_path / "real"), "--generated", str(gen_dir), "--out",
                 str(tmp_path / "rep"), "--n", "120", "--n-concepts", "48", "--top-k", "4", "--sae-epochs", "6",
                 "--n-bootstrap", "100", "--quiet"])
    assert code == 0
    c = pd.read_parquet(tmp_path / "rep" / "blindspots_concepts.parquet")
    assert set(c["generator"]) == {"no-stripes"} and (c["status"] == "suppressed").any()


# ------------------------------------------------------------------------------------------- slow
def _builtin_generators_present() -> bool:
    from concepts.zoo.checkpoint import weights_dir

    try:
        names = ("conceptworld-ar", "conceptworld-diffusion")
        return all((Path(weights_dir(n)) / "config.json").exists() for n in names)
    except Exception:  # noqa: BLE001 - missing folders
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _builtin_generators_present(), reason="built-in generator weights not installed")
def test_default_run_on_builtin_generators(tmp_path):
    out = tmp_path / "blindspots"
    assert main(["blindspots", "--out", str(out), "--quiet"]) == 0
    concepts = pd.read_parquet(out / "blindspots_concepts.parquet")
    assert set(concepts["generator"]) == {"conceptworld-ar", "conceptworld-diffusion"}
    assert (out / "blindspots_cross.csv").exists() and (out / "blindspots_agreement.csv").exists()
    summary = json.loads((out / "blindspots_summary.json").read_text())
    assert set(summary["agreement"]) == {"conceptworld-ar", "conceptworld-diffusion"}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_loads_in_headless_chromium(tiny_run):
    code, out = tiny_run
    assert code == 0
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--dump-dom", (out / "index.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<h1>conceptkit blindspots</h1>" in dom and "</html>" in dom
    concepts = pd.read_parquet(out / "blindspots_concepts.parquet")
    flagged = concepts[concepts["status"].isin(["suppressed", "exaggerated"])]
    assert len(flagged)
    for _, row in flagged.iterrows():  # every flagged concept is on the rendered page, by unit and by name
        assert f'data-unit="{int(row["concept"])}"' in dom
        assert f'#{int(row["concept"])} {row["name"]}' in dom
    assert "Traceback" not in dom and "Uncaught" not in proc.stderr
    assert dom.count("<img") >= 4
