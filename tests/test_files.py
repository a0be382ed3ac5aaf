"""Files: damaged gzip streams and caches are named, the CLI never overwrites silently."""

import gzip
import os

import numpy as np
import pytest
from astropy.table import Table

from stellarlm import DataFileError
from stellarlm.cli import main
from stellarlm.data.gaia_xp import _read_any_table
from stellarlm.data.table import TokenTable
from stellarlm.integrity import check_gzip

from conftest import XP_G


def _corrupt_gz(tmp_path, name="stars.fits.gz"):
    """A FITS table, gzipped, with one byte of its compressed body changed (CRC now wrong)."""
    plain = tmp_path / "plain.fits"
    Table({"g": np.linspace(10, 15, 2000), "teff": np.linspace(4000, 6000, 2000)}).write(plain)
    data = bytearray(gzip.compress(plain.read_bytes()))
    path = tmp_path / name
    return path, data


@pytest.mark.parametrize("position", [0.3, 0.5, 0.9, -6])
def test_a_damaged_gzip_stream_is_refused_by_name(tmp_path, position):
    path, data = _corrupt_gz(tmp_path)
    i = int(len(data) * position) if position > 0 else len(data) + position  # body, or the CRC itself
    data[i] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(DataFileError, match="stars.fits.gz"):
        check_gzip(path)
    with pytest.raises(DataFileError, match="stars.fits.gz"):
        _read_any_table(path)


def test_a_truncated_gzip_stream_is_refused(tmp_path):
    path, data = _corrupt_gz(tmp_path)
    path.write_bytes(bytes(data[: len(data) - 100]))
    with pytest.raises(DataFileError, match="stars.fits.gz"):
        _read_any_table(path)


def test_an_intact_gzip_stream_is_read(tmp_path):
    path, data = _corrupt_gz(tmp_path)
    path.write_bytes(bytes(data))
    check_gzip(path)
    assert len(_read_any_table(path)) == 2000


def test_cli_query_refuses_a_damaged_gz_input(tiny_model, tmp_path, capsys):
    _, model_dir = tiny_model
    path, data = _corrupt_gz(tmp_path)
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    rc = main(["query", "--model", str(model_dir), "--input", str(path), "--want", "logg", "--output",
               str(tmp_path / "o.fits")])
    assert rc == 2 and "stars.fits.gz" in capsys.readouterr().err
    assert not (tmp_path / "o.fits").exists()


@pytest.fixture()
def stars_file(small_embedded, tmp_path):
    held = small_embedded.subset("val").subset(slice(0, 5))
    t = Table({n: held.column(n) for n in XP_G})
    t["ra"] = np.arange(5.0)
    path = tmp_path / "in.ecsv"
    t.write(path)
    return path


def _query(model_dir, src, dst, *extra):
    return main(["query", "--model", str(model_dir), "--input", str(src), "--want", "teff", "--output", str(dst),
                 *extra])


def test_cli_never_overwrites_silently_and_never_the_input(tiny_model, stars_file, tmp_path, capsys):
    _, model_dir = tiny_model
    before = stars_file.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert _query(model_dir, stars_file, stars_file, "--keep", "ra", *extra) == 2
        assert "--input" in capsys.readouterr().err
    assert stars_file.read_bytes() == before
    out = tmp_path / "out.ecsv"
    out.write_text("precious")
    assert _query(model_dir, stars_file, out, "--keep", "ra") == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "precious"
    assert _query(model_dir, stars_file, out, "--keep", "ra", "--overwrite") == 0
    assert list(Table.read(out)["ra"]) == [0.0, 1.0, 2.0, 3.0, 4.0]  # --keep: any column


@pytest.mark.parametrize("output, problem", [("nowhere/out.fits", "does not exist"), ("out.xyz", "format"),
                                             ("readonly/out.fits", "not writable")])
def test_cli_checks_the_output_before_the_work(tiny_model, stars_file, tmp_path, capsys, monkeypatch, output,
                                               problem):
    _, model_dir = tiny_model
    (tmp_path / "readonly").mkdir()
    os.chmod(tmp_path / "readonly", 0o500)
    if os.access(tmp_path / "readonly", os.W_OK) and "readonly" in output:
        pytest.skip("running as a user who can write anywhere")
    import stellarlm.query

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(stellarlm.query.StellarLM, "load", no_work)
    assert _query(model_dir, stars_file, tmp_path / output, "--keep", "ra") == 2
    assert problem in capsys.readouterr().err


def test_cli_keep_names_a_missing_column(tiny_model, stars_file, tmp_path, capsys):
    _, model_dir = tiny_model
    assert _query(model_dir, stars_file, tmp_path / "o.ecsv", "--keep", "dec") == 2
    assert "dec" in capsys.readouterr().err


def test_a_damaged_cache_header_is_named(small_embedded, tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    path = small_embedded.subset(slice(0, 10)).save(tmp_path / "t.safetensors")
    with safe_open(str(path), framework="numpy") as f:
        header = f.metadata()
    arrays = load_file(str(path))
    for key, bad in (("vocab", "{not json"), ("names", '["teff", "nonsense"]'), ("meta", "[1, 2")):
        save_file(arrays, str(path), metadata={**header, key: bad})
        with pytest.raises(DataFileError, match="t.safetensors"):
            TokenTable.load(path)
