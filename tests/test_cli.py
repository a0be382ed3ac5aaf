"""The command line: query files in FITS, ECSV and CSV; data info; clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from stellarlm.cli import main
from conftest import XP_G


@pytest.mark.parametrize("ext", ["fits", "ecsv", "csv"])
def test_query_reads_and_writes_each_format(tiny_model, small_embedded, tmp_path, ext):
    model, model_dir = tiny_model
    held = small_embedded.subset("val").subset(slice(0, 15))
    t = Table({n: held.column(n) for n in XP_G})
    t["source_id"] = held.source_id
    src, dst = tmp_path / f"in.{ext}", tmp_path / f"out.{ext}"
    t.write(src)
    rc = main(["query", "--model", str(model_dir), "--input", str(src), "--want", "teff", "logg",
               "--output", str(dst), "--keep", "source_id"])
    assert rc == 0
    out = Table.read(dst)
    assert list(out["source_id"]) == list(held.source_id)
    direct = model.query({n: held.column(n) for n in XP_G}, ["teff", "logg"])
    np.testing.assert_allclose(np.asarray(out["teff"], float), np.asarray(direct["teff"]), rtol=1e-5)
    assert np.all(np.asarray(out["logg_err"], float) > 0)


def test_query_refuses_unknown_columns_unless_told(tiny_model, tmp_path, capsys):
    _, model_dir = tiny_model
    src = tmp_path / "in.ecsv"
    Table({"g": [12.0], "gmag": [12.1]}).write(src)
    rc = main(["query", "--model", str(model_dir), "--input", str(src), "--want", "teff", "--output",
               str(tmp_path / "o.ecsv")])
    assert rc == 2 and "gmag" in capsys.readouterr().err
    rc = main(["query", "--model", str(model_dir), "--input", str(src), "--want", "teff", "--output",
               str(tmp_path / "o.ecsv"), "--ignore-unknown"])
    assert rc == 0


def test_query_reports_an_unreadable_input(tiny_model, tmp_path, capsys):
    _, model_dir = tiny_model
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"garbage")
    rc = main(["query", "--model", str(model_dir), "--input", str(bad), "--want", "teff", "--output",
               str(tmp_path / "o.fits")])
    assert rc == 2 and "bad.fits" in capsys.readouterr().err


def test_data_info_on_a_missing_build(tmp_path, capsys):
    rc = main(["data", "info", "--cache-dir", str(tmp_path)])
    assert rc == 2 and "stellarlm data build" in capsys.readouterr().err


@pytest.mark.parametrize("product, extra", [("XP_CONTINUOUS", ["--synthetic-g"]), ("XP_SAMPLED", ["--g-mag", "13.871"])])
def test_query_reads_a_gaia_archive_xp_file(tiny_model, tmp_path, product, extra):
    """An archive XP file goes through the same readers as the Python API: the output carries the
    source id, where G came from, and the answers the API gives for the same star."""
    from stellarlm.data.gaia_xp import astroquery_example_files, read_xp_continuous

    model, model_dir = tiny_model
    src = astroquery_example_files()[product]["ecsv"]
    dst = tmp_path / "labels.fits"
    rc = main(["query", "--model", str(model_dir), "--input", str(src), "--want", "teff", "--output", str(dst),
               *extra])
    assert rc == 0
    out = Table.read(dst)
    assert list(out["source_id"]) == [5937083312263887616]
    want_g = "synthetic (gaiaxpy generate)" if product == "XP_CONTINUOUS" else "g_mag argument"
    assert out["g_source"][0] == want_g
    t = read_xp_continuous(astroquery_example_files()["XP_CONTINUOUS"]["ecsv"], g_mag=[13.871])
    direct = model.query(t.observed(t.names), ["teff"])
    assert abs(out["teff"][0] - direct["teff"][0]) < 0.01 * direct["teff_err"][0]


def test_train_without_a_group_and_a_single_token(small_embedded, tmp_path, capsys):
    """--without takes token groups and single tokens: neither is ever given nor asked (the
    fine-tuning experiment pretrains with [alpha/M] withheld this way); a name that is neither is refused."""
    cache = str(Path(small_embedded.meta["path"]).parent)
    tiny = ["--d-model", "16", "--n-heads", "2", "--n-encoder-layers", "1", "--n-decoder-layers", "1",
            "--steps", "2", "--batch-size", "8", "--max-stars", "80", "--workers", "1", "--cache-dir", cache]
    out = tmp_path / "no_alpha"
    assert main(["train", "--out", str(out), "--without", "lamost", "alpha_m", *tiny]) == 0
    trained = json.loads((out / "model.json").read_text())["trained_tokens"]
    assert "alpha_m" not in trained and not any(n.startswith("lamost_") for n in trained)
    assert {"teff", "logg", "m_h", "g"} <= set(trained)
    assert main(["train", "--out", str(tmp_path / "bad"), "--without", "alpha_mh", *tiny]) != 0
    assert "alpha_mh" in capsys.readouterr().err
