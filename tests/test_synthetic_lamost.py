"""The SYNTHETIC LAMOST-like spectra: shapes, reproducibility, label dependence of lines, noise.

Inputs are built here (flat or blackbody continua on the XP grid), no downloaded data.
"""

import numpy as np
import pytest

from stellarlm.data.lamost import lamost_bin_centres, lamost_bin_edges, resample_to_lamost_grid
from stellarlm.data.synthetic_lamost import (PIXELS_PER_BIN, RESOLUTION, fine_lamost, fine_wavelength,
                                             line_free_spectrum, noiseless_lamost, snr_from_g, synthesize_lamost)
from stellarlm.data.xp_basis import XP_WAVELENGTH_NM

WAVE_A = XP_WAVELENGTH_NM * 10.0


def blackbody(teff):
    """(n, 343) Planck F_lambda (arbitrary units) on the XP grid."""
    teff = np.atleast_1d(np.asarray(teff, float))
    x = 1.4388e8 / (WAVE_A[None, :] * teff[:, None])  # hc / (lambda k T), lambda in A
    return 1e20 / (WAVE_A[None, :] ** 5 * np.expm1(x))


def flat(n):
    return np.full((n, XP_WAVELENGTH_NM.size), 3.7e-16)


def depth(spec, wave, offsets=(-6, -5, 5, 6)):
    """1 - (flux in the bin holding ``wave``) / (mean flux of line-free neighbouring bins)."""
    b = np.searchsorted(lamost_bin_edges(), wave) - 1
    return 1.0 - spec[..., b] / spec[..., [b + o for o in offsets]].mean(axis=-1)


def labels(n, teff=5500.0, logg=4.4, m_h=0.0, alpha_m=0.0):
    return [np.broadcast_to(np.asarray(v, float), (n,)).copy() for v in (teff, logg, m_h, alpha_m)]


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(7)
    n = 60
    teff = rng.uniform(3200.0, 12000.0, n)
    return dict(xp_wave_nm=XP_WAVELENGTH_NM, xp_flux=blackbody(teff) * rng.uniform(0.1, 10.0, (n, 1)),
                teff=teff, logg=rng.uniform(0.5, 5.0, n), m_h=rng.uniform(-2.0, 0.4, n),
                alpha_m=rng.uniform(-0.1, 0.4, n), g_mag=rng.uniform(9.0, 16.0, n),
                source_id=rng.integers(0, 2**62, n))


def test_fine_grid_nests_in_the_token_bins_at_three_pixels_per_resolution_element():
    lam = fine_wavelength().reshape(-1, PIXELS_PER_BIN)
    edges = lamost_bin_edges()
    assert lam.shape[0] == lamost_bin_centres().size
    assert np.all(lam[:, 0] > edges[:-1]) and np.all(lam[:, -1] < edges[1:])
    px_per_element = 1.0 / (RESOLUTION * np.diff(np.log(fine_wavelength())))
    np.testing.assert_allclose(px_per_element, 3.0, rtol=1e-3)


def test_shape_dtype_and_median_normalisation(batch):
    values, errors = synthesize_lamost(**batch)
    assert values.shape == errors.shape == (60, 200)
    assert values.dtype == errors.dtype == np.float32
    assert np.all(np.isfinite(values)) and np.all(errors > 0)
    clean = noiseless_lamost(*(batch[k] for k in ("xp_wave_nm", "xp_flux", "teff", "logg", "m_h", "alpha_m")))
    np.testing.assert_allclose(np.median(clean, axis=1), 1.0, rtol=1e-12)
    assert np.all(np.abs(np.median(values, axis=1) - 1.0) < 0.05)


def test_deterministic_and_independent_of_the_rest_of_the_batch(batch):
    v1, e1 = synthesize_lamost(**batch)
    v2, e2 = synthesize_lamost(**batch)
    assert np.array_equal(v1, v2) and np.array_equal(e1, e2)
    idx = np.array([17, 3, 42])
    sub = {k: (v if k == "xp_wave_nm" else v[idx]) for k, v in batch.items()}
    v3, e3 = synthesize_lamost(**sub)
    assert np.array_equal(v3, v1[idx]) and np.array_equal(e3, e1[idx])
    v4, _ = synthesize_lamost(**batch, seed=1)
    assert not np.array_equal(v4, v1)


def test_balmer_lines_peak_near_9000_K_and_broaden_in_dwarfs():
    teff = np.array([5000.0, 9000.0, 15000.0])
    spec = noiseless_lamost(XP_WAVELENGTH_NM, flat(3), *labels(3, teff=teff, logg=4.0))
    for line in (6564.6, 4862.7):
        d = depth(spec, line)
        assert d[1] > d[0] and d[1] > d[2], (line, d)
        assert d[1] > 0.15
    dwarf_giant = noiseless_lamost(XP_WAVELENGTH_NM, flat(2), *labels(2, teff=9000.0, logg=[4.5, 2.0]))
    d = depth(dwarf_giant, 4862.7)
    assert d[0] > d[1]


@pytest.mark.parametrize("line", [8544.4, 5174.1])  # Ca II triplet, Mg b
def test_metal_lines_grow_with_metallicity_and_fade_with_teff(line):
    m_h = np.array([-2.0, -1.0, -0.5, 0.0, 0.4])
    d = depth(noiseless_lamost(XP_WAVELENGTH_NM, flat(5), *labels(5, teff=5000.0, m_h=m_h)), line)
    assert np.all(np.diff(d) > 0), d
    teff = np.array([4500.0, 5500.0, 6500.0, 7500.0])
    d = depth(noiseless_lamost(XP_WAVELENGTH_NM, flat(4), *labels(4, teff=teff, m_h=0.0)), line)
    assert np.all(np.diff(d) < 0), d
    assert d[0] > 0.05 and d[-1] < 0.5 * d[0]


def test_alpha_enhancement_strengthens_ca_but_not_na():
    spec = noiseless_lamost(XP_WAVELENGTH_NM, flat(2), *labels(2, teff=5000.0, alpha_m=[0.0, 0.4]))
    ca, na = depth(spec, 8544.4), depth(spec, 5894.0)
    assert ca[1] > ca[0]
    assert na[1] == pytest.approx(na[0], abs=1e-3)


def test_gravity_na_d_stronger_in_dwarfs_ca_triplet_stronger_in_giants():
    spec = noiseless_lamost(XP_WAVELENGTH_NM, flat(2), *labels(2, teff=4800.0, logg=[4.6, 1.5]))
    assert depth(spec, 5894.0)[0] > depth(spec, 5894.0)[1]
    assert depth(spec, 8544.4)[1] > depth(spec, 8544.4)[0]


def test_tio_bands_appear_below_4000_K():
    teff = np.array([4500.0, 3800.0, 3200.0])
    spec = noiseless_lamost(XP_WAVELENGTH_NM, flat(3), *labels(3, teff=teff, logg=4.8))
    d = depth(spec, 7080.0, offsets=(-6, -5))  # just redward of the 7055 A head vs bluer continuum
    assert abs(d[0]) < 1e-3 and 0 < d[1] < d[2] and d[2] > 0.3, d


def test_missing_inputs_give_all_nan_rows(batch):
    n = 60
    bad = {"teff": 1, "logg": 2, "m_h": 3, "alpha_m": 4, "g_mag": 5}
    inputs = {k: (v.copy() if k != "xp_wave_nm" else v) for k, v in batch.items()}
    for key, row in bad.items():
        inputs[key] = inputs[key].astype(float) if key != "source_id" else inputs[key]
        inputs[key][row] = np.nan
    inputs["teff"][6] = -100.0
    inputs["xp_flux"][7, 100] = np.inf
    values, errors = synthesize_lamost(**inputs)
    nan_rows = [1, 2, 3, 4, 5, 6, 7]
    assert np.all(np.isnan(values[nan_rows])) and np.all(np.isnan(errors[nan_rows]))
    keep = np.setdiff1d(np.arange(n), nan_rows)
    assert np.all(np.isfinite(values[keep])) and np.all(np.isfinite(errors[keep]))
    full, _ = synthesize_lamost(**batch)
    assert np.array_equal(values[keep], full[keep])
    assert np.all(np.isnan(line_free_spectrum(XP_WAVELENGTH_NM, np.full((1, 343), np.nan))))


def test_noise_scales_with_g_and_is_photon_like():
    n = 200
    g = np.repeat([9.0, 12.0, 16.0], n)
    flux = blackbody(np.full(3 * n, 4000.0))
    lab = labels(3 * n, teff=4000.0, logg=4.6)
    values, errors = synthesize_lamost(XP_WAVELENGTH_NM, flux, *lab, g, np.arange(3 * n, dtype=np.int64))
    med = np.median(errors.reshape(3, n, 200), axis=(1, 2))
    assert med[0] < med[1] < med[2]
    np.testing.assert_allclose(med[2] / med[1], snr_from_g(12.0) / snr_from_g(16.0), rtol=0.02)
    # the drawn noise matches the reported errors
    pull = (values - noiseless_lamost(XP_WAVELENGTH_NM, flux, *lab)) / errors
    assert abs(pull.std() - 1.0) < 0.02 and abs(pull.mean()) < 0.02
    # photon-like: sigma = sqrt(f) / snr, so a cool star's faint blue end has a lower S/N than its red end
    # (to 1%: the pixels' noise is set against the median pixel, the values against the median bin)
    clean = noiseless_lamost(XP_WAVELENGTH_NM, flux[:1], *(v[:1] for v in lab))[0]
    np.testing.assert_allclose(errors[0], np.sqrt(np.maximum(clean, 0.05)) / snr_from_g(9.0), rtol=0.01)
    snr = clean / errors
    assert np.all(snr[:, :10].mean(axis=1) < 0.7 * snr[:, -10:].mean(axis=1))


def test_synthetic_lamost_is_binned_by_the_lamost_reader(batch):
    """Each star's fine pixels and inverse variances, through the reader's resample_to_lamost_grid,
    give exactly its synthetic tokens: noiseless values, errors, and, with the star's own noise
    draws, the noisy values."""
    keys = ("xp_wave_nm", "xp_flux", "teff", "logg", "m_h", "alpha_m", "g_mag")
    fine, ivar = fine_lamost(*(batch[k] for k in keys))
    assert fine.shape == ivar.shape == (60, fine_wavelength().size)
    values, errors = synthesize_lamost(**batch)
    clean = noiseless_lamost(*(batch[k] for k in keys[:-1]))
    lam = fine_wavelength()
    for i in (0, 17, 42):
        v, e = resample_to_lamost_grid(lam, fine[i], ivar[i])
        med = np.median(v)
        np.testing.assert_allclose(clean[i], v / med, rtol=1e-12)
        np.testing.assert_allclose(errors[i], e / med, rtol=1e-6)
        s = int(np.int64(batch["source_id"][i]).view(np.uint64))  # the seeding synthesize_lamost documents
        draws = np.random.default_rng([20231, s & 0xFFFFFFFF, s >> 32]).standard_normal(lam.size)
        v_noisy, _ = resample_to_lamost_grid(lam, fine[i] + draws / np.sqrt(ivar[i]), ivar[i])
        np.testing.assert_allclose(values[i], v_noisy / med, rtol=1e-5, atol=1e-6)


def test_synthetic_lamost_pixel_noise_is_photon_like_and_weights_the_bins():
    flux = blackbody([4000.0])
    lab = labels(1, teff=4000.0, logg=4.6)
    fine, ivar = fine_lamost(XP_WAVELENGTH_NM, flux, *lab, [12.0])
    assert np.median(fine) == pytest.approx(1.0)
    # variance proportional to the pixel's flux (above the 5% floor); a median bin has S/N snr_from_g
    np.testing.assert_allclose(ivar[0], snr_from_g(12.0) ** 2 / (PIXELS_PER_BIN * np.maximum(fine[0], 0.05)))
    # inverse-variance weights lean on the dark pixels of a line: the Ca II K bin is not a plain mean
    clean = noiseless_lamost(XP_WAVELENGTH_NM, flux, *lab)[0]
    plain = fine[0].reshape(-1, PIXELS_PER_BIN).mean(axis=1)
    plain /= np.median(plain)
    k = np.searchsorted(lamost_bin_edges(), 3934.8) - 1
    assert clean[k] < 0.9 * plain[k]
