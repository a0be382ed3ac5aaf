"""stellarlm convert: bulk XP text -> binary FITS, the same numbers and the same labels to the bit."""

import hashlib

import numpy as np
import pytest

from stellarlm.data.gaia_bulk import bulk_rows, iter_xp_chunks, write_bulk_file
from stellarlm.data.xp_fits import convert_xp_file, output_name
from stellarlm.errors import DataFileError
from test_survey import _replace_band, _write


@pytest.fixture
def bulk(tmp_path):
    """A gzipped bulk file of 9 stars, one with its BP band ``null`` and one with RP empty."""
    header, lines = bulk_rows(9, seed=5, first_source_id=4000)
    names = header.splitlines()[-1].decode().split(",")
    lines[3] = _replace_band(lines[3], "bp", names, b"null")
    lines[6] = _replace_band(lines[6], "rp", names, b"")
    return _write(tmp_path / "XpContinuousMeanSpectrum_000010-000020.csv.gz", header, lines)


def _stacked(path, chunk_rows=4):
    chunks = list(iter_xp_chunks(path, chunk_rows=chunk_rows))
    return {k: np.concatenate([getattr(c, k) for c in chunks]) for k in
            ("source_id", "coefficients", "errors", "correlations")}


def test_converted_table_holds_the_parsers_numbers_to_the_bit(bulk, tmp_path):
    from astropy.io import fits

    res = convert_xp_file(bulk, tmp_path / "fits", chunk_rows=4)
    out = tmp_path / "fits" / "XpContinuousMeanSpectrum_000010-000020.xp.fits"
    assert res.output == str(out) and res.stars == 9 and output_name(bulk) == out.name
    assert not list((tmp_path / "fits").glob(".*.tmp"))
    with fits.open(out) as h:  # a valid FITS file (astropy checks the structure)
        h.verify("exception")
        head = h[1].header
        assert head["NSTARS"] == 9 and head["INPUT"] == bulk.name
        assert head["INPUTSHA"] == hashlib.sha256(bulk.read_bytes()).hexdigest()
        assert h[1].columns["bp_coefficients"].format == "55D"
    text, binary = _stacked(bulk), _stacked(out)
    for k in text:
        np.testing.assert_array_equal(binary[k], text[k], err_msg=k)
    assert np.isnan(binary["coefficients"][3, 0]).all() and np.isfinite(binary["coefficients"][3, 1]).all()
    assert np.isnan(binary["correlations"][6, 1]).all()


def test_labels_of_the_fits_are_the_labels_of_the_text(tiny_model, tmp_path):
    from stellarlm.survey import label_files
    from test_survey import _read

    _, model_dir = tiny_model
    text = write_bulk_file(tmp_path / "XpContinuousMeanSpectrum_000030-000040.csv.gz", 150, pool=15, seed=7,
                           first_source_id=70)
    binary = convert_xp_file(text, tmp_path / "fits", chunk_rows=64).output
    kw = dict(want=["teff", "logg"], quantiles=[0.16], progress=False, chunk_rows=64)
    from_text = label_files([text], model_dir, tmp_path / "a", **kw)[0]
    from_fits = label_files([binary], model_dir, tmp_path / "b", **kw)[0]
    assert from_text.stars == from_fits.stars == 150
    a, b = _read(from_text.output)[1], _read(from_fits.output)[1]
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_a_malformed_line_is_named_and_leaves_no_output(tmp_path):
    header, lines = bulk_rows(9, seed=5, first_source_id=4000)
    lines[6] = lines[6].replace(b'"[', b'"[x', 1)  # a coefficient that is not a number
    broken = _write(tmp_path / "XpContinuousMeanSpectrum_broken.csv.gz", header, lines)
    line_no = header.count(b"\n") + 7
    with pytest.raises(DataFileError, match=rf"XpContinuousMeanSpectrum_broken.*line {line_no}.*not a number"):
        convert_xp_file(broken, tmp_path / "fits", chunk_rows=4)  # the first chunk was written: removed
    assert not list((tmp_path / "fits").iterdir())


def test_an_existing_output_is_kept_unless_overwrite(bulk, tmp_path):
    out = tmp_path / "fits"
    convert_xp_file(bulk, out)
    with pytest.raises(DataFileError, match="exists already"):
        convert_xp_file(bulk, out)
    assert convert_xp_file(bulk, out, overwrite=True).stars == 9


def test_convert_command(bulk, tmp_path, capsys):
    from stellarlm.cli import main

    missing = tmp_path / "XpContinuousMeanSpectrum_none.csv.gz"
    assert main(["convert", str(bulk), str(missing), "--out", str(tmp_path / "fits")]) == 1
    said = capsys.readouterr().out
    assert "9 stars" in said and f"FAILED {missing}" in said and "no such file" in said
    assert (tmp_path / "fits" / output_name(bulk)).exists()
