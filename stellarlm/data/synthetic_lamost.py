"""SYNTHETIC LAMOST-like low-resolution spectra (the ``lamost_*`` tokens). NOT REAL LAMOST DATA.

Real LAMOST spectra cannot be had offline, so the project fills the ``lamost`` modality with a
semi-analytic stand-in, good for exercising cross-instrument translation, never for science:

1. **Continuum**: the star's own *real* Gaia XP sampled spectrum (336-1020 nm), interpolated
   (Catmull-Rom cubic, local and row by row) onto a fine log-lambda grid over 3700-9000 A with
   24 pixels per ``lamost_*`` bin, i.e. 3.0 pixels per resolution element at R = 1800. XP is
   R ~ 30-100, so this is a smooth continuum that already carries the star's SED and reddening
   (and, smeared out, a little of its line blanketing, which the added lines count a second time).
   XP flux that dips to <= 0 (the blue end of faint red stars) is floored at 1e-3 of the median.
2. **Lines**: a multiplicative transmission ``exp(-tau)``. Every feature is a Gaussian at the
   instrumental resolution R = 1800 (sigma = lambda / (1800 * 2.355)) added in quadrature to an
   intrinsic width, with an integrated optical depth (A; its equivalent width when weak) set by
   the labels through the tables below: Balmer lines, metal lines, and red-degraded TiO bands.
3. **Noise**: photon-like, per fine pixel: with ``f_i`` the pixel's flux over the star's median
   pixel, its inverse variance is ``snr**2 / (PIXELS_PER_BIN * max(f_i, NOISE_FLUX_FLOOR))``, so a
   bin of 24 such pixels has ``sigma = sqrt(f) / snr`` with the S/N ``snr`` from Gaia G. The noise
   is drawn from a generator seeded by ``(seed, source_id)`` so a star's spectrum never depends on
   the batch.
4. **Binning**: the noisy fine pixels are binned onto the ``lamost_*`` bins by
   :func:`~stellarlm.data.lamost.bin_to_lamost_grid` with their inverse variances, the very binning
   a real LAMOST spectrum gets (:func:`~stellarlm.data.lamost.read_lamost_lrs`), so real and
   synthetic tokens are the same kind of number; then divided by the median of the noiseless
   binned spectrum. The error of a bin is ``1 / sqrt(sum ivar)`` of its pixels, the spread of the
   noise it got.

Stars missing any label (teff, logg, m_h, alpha_m, G), with teff <= 0, or with a non-finite XP
spectrum get all-NaN rows: nothing is invented for them.

Example
-------
>>> import numpy as np
>>> from stellarlm.data.xp_basis import XP_WAVELENGTH_NM
>>> flux = np.ones((1, XP_WAVELENGTH_NM.size))  # a flat continuum, any flux unit
>>> values, errors = synthesize_lamost(XP_WAVELENGTH_NM, flux, [5800.0], [4.4], [0.0], [0.0], [12.0], [42])
>>> values.shape, values.dtype
((1, 200), dtype('float32'))
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..vocab import N_LAMOST
from .lamost import bin_to_lamost_grid, lamost_bin_edges

RESOLUTION = 1800.0  # LAMOST low-resolution mode, lambda / FWHM
PIXELS_PER_BIN = 24  # fine pixels per lamost_* bin: 3.0 pixels per resolution element at R = 1800
CHUNK = 128  # stars per chunk: ~5 MB float64 work arrays stay in cache (40k stars: ~15 s)
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_SQRT_2PI = math.sqrt(2.0 * math.pi)

# --- Balmer lines ---------------------------------------------------------------------------
# Hydrogen absorbs from n = 2, whose population (Boltzmann) rises with Teff while hydrogen itself
# ionises (Saha): the lines peak in A stars. Strength is a Gaussian in log10 Teff peaking at 9000 K,
# narrower on the cool side (n = 2 empties fast) than on the hot side (ionisation is gradual).
# Stark (pressure) broadening grows with electron pressure, i.e. with gravity: the intrinsic width
# and, through the wings, the integrated optical depth scale as 10**(0.2 (logg - 4)).
# name, vacuum wavelength [A], integrated optical depth at the Teff peak and logg = 4 [A],
# intrinsic sigma at logg = 4 [A]
BALMER_LINES = (
    ("H-alpha", 6564.6, 14.0, 7.0),
    ("H-beta", 4862.7, 15.0, 6.0),
    ("H-gamma", 4341.7, 14.0, 5.5),
    ("H-delta", 4102.9, 13.0, 5.0),
    ("H-epsilon", 3971.2, 9.0, 4.0),
    ("H8", 3890.2, 7.0, 3.5),
)
BALMER_TEFF_PEAK = 9000.0  # K
BALMER_LOGT_SIGMA_COOL = 0.12  # dex in log10 Teff below the peak (sun: ~0.27 of the A-star strength)
BALMER_LOGT_SIGMA_HOT = 0.20  # dex above the peak (15,000 K B star: ~0.5)
BALMER_LOGG_REF = 4.0
BALMER_LOGG_SLOPE = 0.2  # d log10(width) / d logg

# --- Metal lines -----------------------------------------------------------------------------
# tau scales with the abundance of the absorber: 10**m_h, times 10**alpha_m for the alpha elements
# Mg and Ca. Neutral metals and CH are ionised / dissociated in hot stars, so each line fades with
# Teff as a logistic 1 / (1 + exp((Teff - T_half) / dT)): strong below ~5500 K, gone above ~7000 K.
# Ca II is the dominant stage of Ca in F-G-K stars and only turns to Ca III in A stars, so its
# lines survive hotter. Gravity (10**(s (logg - 4.4))): Na D and Mg b have pressure-broadened wings
# (stronger in dwarfs, s > 0); the Ca II triplet is stronger in giants (lower pressure, more Ca II, s < 0).
# name, vacuum wavelength [A], integrated optical depth for a solar-metallicity cool dwarf [A],
# intrinsic sigma [A], T_half [K], dT [K], alpha element?, logg slope s
METAL_LINES = (
    ("Ca II K", 3934.8, 15.0, 4.0, 8000.0, 500.0, True, 0.0),
    ("Ca II H", 3969.6, 12.0, 4.0, 8000.0, 500.0, True, 0.0),
    ("CH G band", 4305.0, 5.0, 8.0, 6000.0, 350.0, False, 0.0),
    ("Fe I 4384", 4384.8, 1.0, 1.5, 6500.0, 500.0, False, 0.0),
    ("Mg b4", 5168.8, 0.8, 1.0, 6500.0, 500.0, True, 0.1),
    ("Mg b2", 5174.1, 1.2, 1.0, 6500.0, 500.0, True, 0.1),
    ("Mg b1", 5185.0, 1.5, 1.0, 6500.0, 500.0, True, 0.1),
    ("Fe I 5271", 5271.9, 1.2, 1.5, 6500.0, 500.0, False, 0.0),
    ("Fe I 5337", 5336.8, 1.0, 1.5, 6500.0, 500.0, False, 0.0),
    ("Na D2", 5891.6, 0.8, 0.5, 6500.0, 500.0, False, 0.2),
    ("Na D1", 5897.6, 0.6, 0.5, 6500.0, 500.0, False, 0.2),
    ("Ca II 8500", 8500.4, 1.3, 1.5, 7000.0, 500.0, True, -0.15),
    ("Ca II 8544", 8544.4, 3.4, 1.5, 7000.0, 500.0, True, -0.15),
    ("Ca II 8665", 8664.5, 2.7, 1.5, 7000.0, 500.0, True, -0.15),
)
METAL_LOGG_REF = 4.4

# --- TiO bands ---------------------------------------------------------------------------------
# TiO forms once Teff < ~4000 K and its abundance climbs steeply as the gas cools. Each band is a
# sharp head with absorption fading redward (red-degraded): tau = tau0 * exp(-(lambda - head) / L)
# for lambda > head, smoothed by the instrument. tau0 * max(0, (4000 - Teff) / 500)**1.5
# * 10**(m_h + alpha_m) (Ti and O are both alpha-like elements).
# name, vacuum band head [A], peak optical depth at Teff = 3500 K and solar abundances, e-folding length [A]
TIO_BANDS = (
    ("TiO 6160", 6160.0, 0.35, 80.0),
    ("TiO 7055", 7055.0, 0.60, 100.0),
    ("TiO 7670", 7670.0, 0.40, 120.0),
)
TIO_TEFF_ONSET = 4000.0  # K
TIO_TEFF_SCALE = 500.0  # K
TIO_POWER = 1.5

# The formulas (not the labels) see labels clipped to this domain, only to keep powers finite.
LABEL_DOMAIN = {"teff": (2000.0, 60000.0), "logg": (-1.0, 6.0), "m_h": (-5.0, 1.5), "alpha_m": (-1.0, 1.5)}

# --- Noise -----------------------------------------------------------------------------------
SNR_AT_G10 = 300.0  # S/N per bin at the median flux for G = 10; photon noise: S/N ~ 10**(-0.2 (G - 10))
SNR_RANGE = (5.0, 300.0)
NOISE_FLUX_FLOOR = 0.05  # a pixel fainter than 5% of the median is as noisy as one at 5% (sky, read noise)
CONTINUUM_FLOOR = 1e-3  # x the XP median over 3700-9000 A: faint red stars' XP dips to <= 0 in the blue


@lru_cache(maxsize=1)
def fine_wavelength() -> np.ndarray:
    """Centres (A, vacuum) of the fine log-lambda pixels, ``PIXELS_PER_BIN`` per lamost_* bin."""
    log_e = np.log(lamost_bin_edges())
    frac = (np.arange(PIXELS_PER_BIN) + 0.5) / PIXELS_PER_BIN
    out = np.exp(log_e[:-1, None] + np.diff(log_e)[:, None] * frac[None, :]).ravel()
    out.flags.writeable = False
    return out


def instrumental_sigma(wave: np.ndarray | float) -> np.ndarray | float:
    """Gaussian sigma (A) of the R = 1800 line spread function at ``wave`` (A)."""
    return wave / RESOLUTION * _FWHM_TO_SIGMA


def snr_from_g(g_mag: np.ndarray) -> np.ndarray:
    """Median-bin S/N of the synthetic spectrum for Gaia G magnitude ``g_mag``."""
    return np.clip(SNR_AT_G10 * 10.0 ** (-0.2 * (np.asarray(g_mag, float) - 10.0)), *SNR_RANGE)


def xp_continuum(xp_wave_nm: np.ndarray, xp_flux: np.ndarray) -> np.ndarray:
    """(n, 343) XP flux -> (n, n_fine) continuum on :func:`fine_wavelength` (Catmull-Rom cubic).

    Row by row and elementwise (no BLAS), so a row never depends on the other rows.
    """
    x = np.asarray(xp_wave_nm, float) * 10.0  # nm -> A
    step = np.diff(x)
    if x.ndim != 1 or not np.allclose(step, step[0]) or step[0] <= 0:
        raise ValueError("xp_wave_nm must be an increasing, evenly spaced grid")
    lam = fine_wavelength()
    if x[1] > lam[0] or x[-2] < lam[-1]:
        raise ValueError(f"xp_wave_nm must cover {lam[0] / 10:.1f}-{lam[-1] / 10:.1f} nm with a sample to spare")
    flux = np.asarray(xp_flux, float)
    pos = (lam - x[0]) / step[0]
    i = np.floor(pos).astype(int)
    t = pos - i
    weights = (  # Keys cubic convolution, a = -0.5: exact for quadratics, C1-continuous
        ((-0.5 * t + 1.0) * t - 0.5) * t,
        (1.5 * t - 2.5) * t * t + 1.0,
        ((-1.5 * t + 2.0) * t + 0.5) * t,
        (0.5 * t - 0.5) * t * t,
    )
    out = flux[:, i - 1] * weights[0]
    for k in (1, 2, 3):
        out += flux[:, i - 1 + k] * weights[k]
    return out


def _clipped(name: str, v: np.ndarray) -> np.ndarray:
    return np.clip(v, *LABEL_DOMAIN[name])


def _add_gaussian(tau, centre, sigma, strength, widest):
    """Add ``strength * N(lambda; centre, sigma)`` (per star) to ``tau`` within +-6 ``widest``.

    ``widest`` is a fixed bound on ``sigma``, so the window never depends on the batch.
    """
    lam = fine_wavelength()
    half = 6.0 * widest
    lo, hi = np.searchsorted(lam, [centre - half, centre + half])
    x = lam[lo:hi] - centre
    s = np.reshape(sigma, (-1, 1))
    tau[:, lo:hi] += np.reshape(strength, (-1, 1)) / (_SQRT_2PI * s) * np.exp(-0.5 * (x / s) ** 2)


@lru_cache(maxsize=None)
def _tio_profile(head: float, length: float) -> tuple[int, np.ndarray]:
    """Unit red-degraded band (step at ``head``, e-folding ``length``) convolved with the LSF."""
    lam = fine_wavelength()
    s = instrumental_sigma(head)
    lo, hi = np.searchsorted(lam, [head - 6.0 * s, head + 10.0 * length])
    x = lam[lo:hi] - head
    # exponentially modified Gaussian: (step * exp(-x / L)) convolved with N(0, s)
    z = (s / length - x / s) / math.sqrt(2.0)
    erfc = np.array([math.erfc(v) for v in z])
    prof = 0.5 * np.exp(0.5 * (s / length) ** 2 - x / length) * erfc
    prof.flags.writeable = False
    return int(lo), prof


def line_optical_depth(teff, logg, m_h, alpha_m) -> np.ndarray:
    """(n, n_fine) optical depth of all Balmer, metal and TiO features for finite labels."""
    teff = _clipped("teff", np.asarray(teff, float))
    logg = _clipped("logg", np.asarray(logg, float))
    m_h = _clipped("m_h", np.asarray(m_h, float))
    alpha_m = _clipped("alpha_m", np.asarray(alpha_m, float))
    tau = np.zeros((teff.size, fine_wavelength().size))

    dlogt = np.log10(teff) - math.log10(BALMER_TEFF_PEAK)
    balmer_t = np.exp(-0.5 * (dlogt / np.where(dlogt < 0, BALMER_LOGT_SIGMA_COOL, BALMER_LOGT_SIGMA_HOT)) ** 2)
    pressure = 10.0 ** (BALMER_LOGG_SLOPE * (logg - BALMER_LOGG_REF))
    # the +-6 sigma window must not depend on the batch: take the widest a label in the domain allows
    widest = 10.0 ** (BALMER_LOGG_SLOPE * (LABEL_DOMAIN["logg"][1] - BALMER_LOGG_REF))
    for _, wave, w0, sig0 in BALMER_LINES:
        sigma = np.hypot(instrumental_sigma(wave), sig0 * pressure)
        bound = np.hypot(instrumental_sigma(wave), sig0 * widest)
        _add_gaussian(tau, wave, sigma, w0 * balmer_t * pressure, bound)

    metals = 10.0 ** m_h
    alpha = 10.0 ** alpha_m
    for _, wave, w0, sig_int, t_half, dt, is_alpha, s_logg in METAL_LINES:
        strength = (w0 * metals * (alpha if is_alpha else 1.0)
                    / (1.0 + np.exp(np.clip((teff - t_half) / dt, -50.0, 50.0)))
                    * 10.0 ** (s_logg * (logg - METAL_LOGG_REF)))
        sigma = np.hypot(instrumental_sigma(wave), sig_int)
        _add_gaussian(tau, wave, sigma, strength, sigma)

    # 1 at Teff = TIO_TEFF_ONSET - TIO_TEFF_SCALE = 3500 K and solar abundances, 0 above the onset
    tio = np.maximum(0.0, (TIO_TEFF_ONSET - teff) / TIO_TEFF_SCALE) ** TIO_POWER * 10.0 ** (m_h + alpha_m)
    if np.any(tio > 0):
        for _, head, tau0, length in TIO_BANDS:
            lo, prof = _tio_profile(head, length)
            tau[:, lo:lo + prof.size] += (tau0 * tio)[:, None] * prof
    return tau


def fine_ivar(fine: np.ndarray, snr: np.ndarray | float = 1.0) -> np.ndarray:
    """Photon-noise inverse variance of fine pixels ``fine`` (flux over the star's median pixel).

    A pixel's variance is ``max(f, NOISE_FLUX_FLOOR) * PIXELS_PER_BIN / snr**2``: photon noise, with
    the floor standing for sky and read noise, scaled so that a bin of ``PIXELS_PER_BIN`` pixels at
    the median flux has S/N ``snr`` (per star, shape (n,) or a scalar).

    >>> float(fine_ivar(np.array([[1.0]]), 100.0)[0, 0]) * PIXELS_PER_BIN
    10000.0
    """
    snr = np.reshape(np.asarray(snr, float), (-1, 1))
    return snr ** 2 / (PIXELS_PER_BIN * np.maximum(fine, NOISE_FLUX_FLOOR))


def _fine_spectra(xp_wave_nm, xp_flux, labels, r) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless fine-pixel spectra of rows ``r``, each over its median pixel, and which rows are usable."""
    lam = fine_wavelength()
    in_range = (np.asarray(xp_wave_nm) * 10.0 >= lam[0]) & (np.asarray(xp_wave_nm) * 10.0 <= lam[-1])
    med = np.median(xp_flux[r][:, in_range], axis=1, keepdims=True)
    good = med[:, 0] > 0  # an XP spectrum with a non-positive median is unusable
    fine = np.maximum(xp_continuum(xp_wave_nm, xp_flux[r] / np.where(good[:, None], med, 1.0)),
                      CONTINUUM_FLOOR)
    if labels is not None:
        fine *= np.exp(-line_optical_depth(*(v[r] for v in labels)))
    # the noise floor is relative to the median pixel: put each star there before its ivar
    fine /= np.median(fine, axis=1, keepdims=True)
    return fine, good


def _spectra(xp_wave_nm, xp_flux, labels, ok, snr=None, noise=None) -> tuple[np.ndarray, np.ndarray]:
    """(n, 200) median-normalised binned spectra and errors of the rows in ``ok`` (NaN elsewhere).

    Fine pixels get :func:`fine_ivar` (with ``snr`` (n,); without it S/N 1, which changes the
    errors but not the values: weights are relative) and are binned by
    :func:`~stellarlm.data.lamost.bin_to_lamost_grid`. ``noise(row)`` gives a star's standard normal
    draws, one per fine pixel, added with sigma ``1 / sqrt(ivar)``; without it the spectra are
    noiseless. Everything is divided by the median of the noiseless binned spectrum. By chunks.
    """
    xp_flux = np.asarray(xp_flux, float)
    values = np.full((xp_flux.shape[0], N_LAMOST), np.nan)
    errors = values.copy()
    lam = fine_wavelength()
    rows = np.flatnonzero(ok)
    for start in range(0, rows.size, CHUNK):
        r = rows[start:start + CHUNK]
        fine, good = _fine_spectra(xp_wave_nm, xp_flux, labels, r)
        ivar = fine_ivar(fine, 1.0 if snr is None else snr[r])
        clean = bin_to_lamost_grid(lam, fine, ivar)
        binned = clean.values
        if noise is not None:
            drawn = np.vstack([noise(i) for i in r]) / np.sqrt(ivar)
            binned = bin_to_lamost_grid(lam, fine + drawn, ivar).values
        med = np.median(clean.values, axis=1, keepdims=True)
        values[r[good]] = (binned / med)[good]
        errors[r[good]] = (clean.errors / med)[good]
    return values, errors


def _check(xp_wave_nm, xp_flux, *arrays) -> tuple[np.ndarray, list[np.ndarray]]:
    xp_flux = np.asarray(xp_flux, float)
    if xp_flux.ndim != 2 or xp_flux.shape[1] != np.size(xp_wave_nm):
        raise ValueError(f"xp_flux must be (n, {np.size(xp_wave_nm)}), got {xp_flux.shape}")
    arrays = [np.asarray(a, float).reshape(-1) for a in arrays]
    for a in arrays:
        if a.size != xp_flux.shape[0]:
            raise ValueError(f"label arrays must have {xp_flux.shape[0]} entries, got {a.size}")
    ok = np.all(np.isfinite(xp_flux), axis=1)
    for a in arrays:
        ok &= np.isfinite(a)
    if arrays:
        ok &= arrays[0] > 0  # teff comes first
    return ok, arrays


def line_free_spectrum(xp_wave_nm: np.ndarray, xp_flux: np.ndarray) -> np.ndarray:
    """(n, 200) noiseless binned XP continuum alone, divided by its median: the spectrum without lines."""
    ok, _ = _check(xp_wave_nm, xp_flux)
    return _spectra(xp_wave_nm, xp_flux, None, ok)[0]


def noiseless_lamost(xp_wave_nm, xp_flux, teff, logg, m_h, alpha_m) -> np.ndarray:
    """(n, 200) float64 synthetic spectra before noise (NaN rows where inputs are missing)."""
    ok, labels = _check(xp_wave_nm, xp_flux, teff, logg, m_h, alpha_m)
    return _spectra(xp_wave_nm, xp_flux, labels, ok)[0]


def fine_lamost(xp_wave_nm, xp_flux, teff, logg, m_h, alpha_m, g_mag) -> tuple[np.ndarray, np.ndarray]:
    """(n, n_fine) noiseless fine pixels (over each star's median pixel) and their inverse variance.

    What :func:`synthesize_lamost` bins, on :func:`fine_wavelength`; rows lacking an input are NaN.

    >>> from stellarlm.data.xp_basis import XP_WAVELENGTH_NM
    >>> f, iv = fine_lamost(XP_WAVELENGTH_NM, np.ones((1, 343)), [5800.0], [4.4], [0.0], [0.0], [12.0])
    >>> f.shape == iv.shape == (1, fine_wavelength().size)
    True
    """
    ok, (teff, logg, m_h, alpha_m, g_mag) = _check(xp_wave_nm, xp_flux, teff, logg, m_h, alpha_m, g_mag)
    flux = np.full((ok.size, fine_wavelength().size), np.nan)
    ivar = flux.copy()
    r = np.flatnonzero(ok)
    if r.size:
        fine, good = _fine_spectra(xp_wave_nm, np.asarray(xp_flux, float), (teff, logg, m_h, alpha_m), r)
        flux[r[good]] = fine[good]
        ivar[r[good]] = fine_ivar(fine, snr_from_g(g_mag[r]))[good]
    return flux, ivar


def synthesize_lamost(xp_wave_nm: np.ndarray, xp_flux: np.ndarray, teff: np.ndarray, logg: np.ndarray,
                      m_h: np.ndarray, alpha_m: np.ndarray, g_mag: np.ndarray, source_id: np.ndarray,
                      seed: int = 20231) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC LAMOST-like spectra: float32 (n, 200) values (median-normalised) and 1-sigma errors.

    ``xp_wave_nm`` (343,): the Gaia XP sampling grid (nm); ``xp_flux`` (n, 343): each star's sampled
    XP spectrum in any flux unit; labels (n,): teff [K], logg, m_h, alpha_m [dex], ``g_mag`` Gaia G;
    ``source_id`` (n,) int64 seeds each star's noise with ``seed``. Rows lacking a label or with a
    non-finite XP spectrum are all NaN. The noisy fine pixels (:func:`fine_lamost`, plus noise of
    sigma ``1 / sqrt(ivar)``) are binned by :func:`~stellarlm.data.lamost.bin_to_lamost_grid`, as a
    real LAMOST spectrum is, and divided by the median of the noiseless binned spectrum.
    """
    ok, (teff, logg, m_h, alpha_m, g_mag) = _check(xp_wave_nm, xp_flux, teff, logg, m_h, alpha_m, g_mag)
    sid = np.asarray(source_id).astype(np.int64).reshape(-1).view(np.uint64)
    if sid.size != ok.size:
        raise ValueError(f"source_id must have {ok.size} entries, got {sid.size}")
    n_fine = fine_wavelength().size

    def noise(i: int) -> np.ndarray:  # one generator per star: its draws never depend on the batch
        s = int(sid[i])
        return np.random.default_rng([int(seed), s & 0xFFFFFFFF, s >> 32]).standard_normal(n_fine)

    values, errors = _spectra(xp_wave_nm, xp_flux, (teff, logg, m_h, alpha_m), ok, snr_from_g(g_mag), noise)
    return values.astype(np.float32), errors.astype(np.float32)
