"""Gaia DR3 XP spectra as the archive gives them -> TokenTable of XP flux tokens.

:func:`read_xp_continuous` reads the ``XP_CONTINUOUS`` product (55 BP + 55 RP coefficients with
errors and correlations) and :func:`read_xp_sampled` the ``XP_SAMPLED`` one (the spectrum on
336-1020 nm); both give the same tokens, ``xp_338`` .. ``xp_1016``: the flux in 6 nm bins scaled to
G = 15 (:mod:`stellarlm.data.xp_basis` says why fluxes). The archive delivers each product as CSV,
ECSV, FITS or VOTable; all four are read. :func:`download_xp_continuous` fetches spectra (and G
from ``gaiadr3.gaia_source``) through astroquery and writes one file that
:func:`read_xp_continuous` reads.

Example
-------
Fetching needs the network (the Gaia archive), so these two lines are not run by the doctests:

>>> from stellarlm.data.gaia_xp import download_xp_continuous, read_xp_continuous
>>> path = download_xp_continuous([5853498713190525696], "xp.ecsv")  # doctest: +SKIP
>>> table = read_xp_continuous(path)                                  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BadValueError, DataFileError
from ..vocab import GAIA_G_ZEROPOINT, N_XP, XP_NAMES, Vocabulary
from .table import TokenTable
from .xp_basis import XP_WAVELENGTH_NM, coefficients_to_tokens, sampled_to_tokens

# the archive's table reading and the download have their own modules; their names the other
# readers and users import stay importable from here
from .archive_tables import _column_lookup, _read_any_table, _source_ids, array_column, float_column  # noqa: F401
from .gaia_download import download_xp_continuous  # noqa: F401

if TYPE_CHECKING:
    from astropy.table import Table

BANDS = ("bp", "rp")
REQUIRED_COLUMNS = ("source_id", "bp_coefficients", "bp_coefficient_errors", "rp_coefficients",
                    "rp_coefficient_errors")
# Uncertainty of the EDR3 G zero point (Riello et al. 2021): the floor of any G magnitude error.
GAIA_G_ZEROPOINT_ERROR = 0.0027553202
# --- G magnitude ------------------------------------------------------------------------------------
def _g_from_argument(g_mag, source_id: np.ndarray) -> np.ndarray:
    if isinstance(g_mag, Mapping):
        g = np.array([float(g_mag.get(int(s), g_mag.get(str(s), math.nan))) for s in source_id])
    else:
        g = np.asarray(g_mag, dtype=np.float64).ravel()
        if g.shape != source_id.shape:
            raise BadValueError(f"g_mag has {g.size} values but the file has {source_id.size} rows; pass one "
                                "G per row (in file order) or a dict source_id -> G")
    return np.where(np.isfinite(g), g, np.nan)


G_ORIGINS = ("phot_g_mean_mag", "phot_g_mean_flux", "g_mag argument", "synthetic (gaiaxpy generate)", "none")


def _g_magnitudes(table: Table, cols: dict[str, str], path: Path, source_id: np.ndarray, g_mag,
                  coeff: np.ndarray | None = None, coeff_err: np.ndarray | None = None,
                  corr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """G, its error, and where each star's G came from (one of :data:`G_ORIGINS`).

    Per star, in order of preference: the file's ``phot_g_mean_mag`` (an archive join), its
    ``phot_g_mean_flux`` (e-/s), then the ``g_mag`` argument: values, or ``"synthetic"`` for
    G computed from the coefficients (``coeff`` etc., (n, 2, 55)) by gaiaxpy.
    """
    n = len(source_id)
    g = np.full(n, np.nan)
    origin = np.full(n, "none", dtype=object)
    have_any_source = False
    if "phot_g_mean_mag" in cols:
        have_any_source = True
        m = float_column(table, cols["phot_g_mean_mag"], path)
        ok = np.isfinite(m)
        g[ok], origin[ok] = m[ok], "phot_g_mean_mag"
    flux = flux_err = None
    if "phot_g_mean_flux" in cols:
        have_any_source = True
        flux = float_column(table, cols["phot_g_mean_flux"], path)
        ok = np.isnan(g) & np.isfinite(flux) & (flux > 0)
        g[ok], origin[ok] = GAIA_G_ZEROPOINT - 2.5 * np.log10(flux[ok]), "phot_g_mean_flux"
        if "phot_g_mean_flux_error" in cols:
            flux_err = float_column(table, cols["phot_g_mean_flux_error"], path)
        elif "phot_g_mean_flux_over_error" in cols:
            flux_err = flux / float_column(table, cols["phot_g_mean_flux_over_error"], path)
    g_err = np.full(n, np.nan)
    if isinstance(g_mag, str):
        if g_mag != "synthetic" or coeff is None:
            raise BadValueError(f"g_mag={g_mag!r}: the only word accepted is 'synthetic', and only for "
                                "XP_CONTINUOUS input (G computed from the coefficients)")
        have_any_source = True
        todo = np.isnan(g) & np.isfinite(coeff[:, :, 0]).all(1)
        if todo.any():
            g[todo], g_err[todo] = synthetic_g(source_id[todo], coeff[todo], coeff_err[todo], corr[todo])
            origin[todo] = "synthetic (gaiaxpy generate)"
    elif g_mag is not None:
        have_any_source = True
        a = _g_from_argument(g_mag, source_id)
        ok = np.isnan(g) & np.isfinite(a)
        g[ok], origin[ok] = a[ok], "g_mag argument"
    if not have_any_source:
        raise DataFileError(path, "no G magnitude to scale the XP spectrum by: the file has neither "
                            "phot_g_mean_mag nor phot_g_mean_flux, and no g_mag was given (a value per star, "
                            "or 'synthetic' to compute it from the spectrum)", column="phot_g_mean_mag")

    # Error of G, best first: the file's own magnitude error; one from the flux error (with the
    # zero-point error added in quadrature, as the Gaia archive does); else the vocabulary's assumed one.
    if "phot_g_mean_mag_error" in cols:
        g_err = np.where(origin == "phot_g_mean_mag", float_column(table, cols["phot_g_mean_mag_error"], path), g_err)
    if flux is not None and flux_err is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            from_flux = np.hypot(2.5 / math.log(10) * flux_err / flux, GAIA_G_ZEROPOINT_ERROR)
        g_err = np.where(np.isfinite(g_err) & (g_err > 0), g_err, from_flux)
    # (stars still without an error get the vocabulary's assumed one, in the readers)
    return g, g_err, origin


def synthetic_g(source_id: np.ndarray, coeff: np.ndarray, coeff_err: np.ndarray, corr: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """G magnitude (Gaia DR3 Vega) and its error computed from XP coefficients (n, 2, 55) by gaiaxpy's
    synthetic photometry (``generate``); for files that carry no G (DataLink products). On the
    astroquery star it gives 13.871. The error is the larger of gaiaxpy's and 0.01 mag (the
    synthetic G's systematic offset from the measured one is of that order)."""
    import pandas as pd

    from .xp_basis import gaiaxpy_quietly

    rows = []
    for i, sid in enumerate(source_id):
        row = {"source_id": int(sid)}
        for b, band in enumerate(BANDS):
            row[f"{band}_coefficients"] = coeff[i, b]
            row[f"{band}_coefficient_errors"] = coeff_err[i, b]
            row[f"{band}_coefficient_correlations"] = corr[i, b]
            row[f"{band}_n_parameters"] = N_XP
            row[f"{band}_standard_deviation"] = 1.0
        rows.append(row)
    with gaiaxpy_quietly():
        from gaiaxpy import PhotometricSystem, generate

        out = generate(pd.DataFrame(rows), photometric_system=PhotometricSystem.Gaia_DR3_Vega, save_file=False)
    g = np.asarray(out["GaiaDr3Vega_mag_G"], dtype=np.float64)
    err = np.asarray(out.get("GaiaDr3Vega_mag_error_G", np.full(len(g), np.nan)), dtype=np.float64)
    return g, np.where(np.isfinite(err), np.maximum(err, 0.01), 0.01)


# --- the reader -------------------------------------------------------------------------------------
def relevant_bases_counts(n_relevant, n_stars: int) -> np.ndarray:
    """(n_stars,) int: each star's ``n_relevant`` (the archive's ``bp_n_relevant_bases`` /
    ``rp_n_relevant_bases``: one number per star, or one for all), checked.

    Raises ValueError for the wrong shape or a count that is not a whole number from 1 to 55.

    >>> relevant_bases_counts(12, 2).tolist(), relevant_bases_counts([2, 55], 2).tolist()
    ([12, 12], [2, 55])
    """
    n = np.asarray(n_relevant, dtype=float)
    n = np.full(n_stars, n) if n.ndim == 0 else n
    if n.shape != (n_stars,):
        raise ValueError(f"has shape {n.shape}; expected ({n_stars},) or one number")
    bad = ~np.isin(n, np.arange(1, N_XP + 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"must be whole numbers from 1 to {N_XP}; row {i} has {n[i]}")
    return n.astype(int)


GInput = Sequence[float] | np.ndarray | Mapping[int, float] | str | None


def read_xp_continuous(path: str | Path, g_mag: GInput = None, *, truncate: bool = False,
                       vocab: Vocabulary | None = None) -> TokenTable:
    """Read a Gaia DR3 ``XP_CONTINUOUS`` file (CSV, ECSV, FITS or VOTable) into a TokenTable.

    The coefficients go forward through gaiaxpy's basis to the sampled spectrum, which is binned to
    the 114 XP flux tokens and scaled to G = 15 (:mod:`stellarlm.data.xp_basis`): the same tokens,
    within float32 precision, as the star's ``XP_SAMPLED`` spectrum gives (:func:`read_xp_sampled`).

    Parameters
    ----------
    path : file from the Gaia archive (DataLink, ``COMBINED`` or ``INDIVIDUAL`` structure) or from
        :func:`download_xp_continuous`; the format is taken from the ending (``.csv``, ``.ecsv``,
        ``.fits``, ``.xml``/``.vot``, each optionally ``.gz``).
    g_mag : G magnitudes for stars whose G is not in the file: an array with one value per row (in
        file order), a dict ``source_id -> G``, or ``"synthetic"`` to compute G from the spectrum
        itself (gaiaxpy ``generate``, Gaia_DR3_Vega). Used only where the file has no
        ``phot_g_mean_mag`` or ``phot_g_mean_flux`` for a star; ``meta['g_source']`` counts which
        was used, and the output's ``g_source`` column (per star) says it too.
    truncate : use only each band's first ``bp_n_relevant_bases`` / ``rp_n_relevant_bases``
        coefficients (columns the file must then have), as GaiaXPy's ``truncation=True`` does: a
        smoother flux; the errors stay those of the whole spectrum.
    vocab : vocabulary of the table (default: :meth:`Vocabulary.default`).

    Returns
    -------
    TokenTable with the XP tokens ``xp_338`` .. ``xp_1016`` and ``g``; ``source_id`` is the Gaia
    DR3 id and ``star_id`` ``"Gaia DR3 <id>"``. A star with an empty band keeps its row with the
    bins that need that band missing (BP alone gives 336-634 nm); a star whose G is unknown keeps
    its row with all XP tokens missing. Counts of both are in ``meta``.

    Raises
    ------
    DataFileError
        naming the file and the column: a required column is missing, an array does not have 55
        elements, a present coefficient has a zero, negative or missing error, the file cannot be
        read, or there is no G at all (column ``phot_g_mean_mag``); with ``truncate``, an
        ``n_relevant_bases`` column is missing or holds a count outside 1-55 for a present band.

    Notes
    -----
    The archive's ``bp_coefficient_errors`` are used as they are, with the
    ``bp_coefficient_correlations``: GaiaXPy divides the errors by ``bp_standard_deviation`` to
    build its covariance and multiplies the sampled errors by it again, so the net covariance is
    the archived errors and correlations. A file without correlations is read as uncorrelated
    coefficients (counted in ``meta``; the flux errors are then off by up to ~30%).

    Example
    -------
    >>> from stellarlm.data.gaia_xp import astroquery_example_files
    >>> path = astroquery_example_files()["XP_CONTINUOUS"]["ecsv"]   # one real DR3 star
    >>> t = read_xp_continuous(path, g_mag=[13.871])
    >>> t.names[0], t.names[-1], round(float(t.column("xp_638")[0]), 2)
    ('xp_338', 'g', 2.83)
    """
    path = Path(path)
    table = _read_any_table(path)
    return xp_table_to_tokens(table, path, g_mag=g_mag, truncate=truncate, vocab=vocab)


def xp_table_to_tokens(table: Table, path: str | Path, g_mag: GInput = None, truncate: bool = False,
                       vocab: Vocabulary | None = None) -> TokenTable:
    """The work of :func:`read_xp_continuous` on an astropy Table already in memory (``path`` is only
    used in messages)."""
    vocab = vocab or Vocabulary.default()
    cols = _column_lookup(table)
    for c in REQUIRED_COLUMNS:
        if c not in cols:
            raise DataFileError(path, "required column missing from the XP_CONTINUOUS file", column=c)
    source_id = _source_ids(table, cols["source_id"], path)
    n = len(source_id)

    coeff = np.full((n, 2, N_XP), np.nan)
    coeff_err = np.full((n, 2, N_XP), np.nan)
    corr = np.zeros((n, 2, N_XP * (N_XP - 1) // 2))
    n_relevant = np.full((n, 2), N_XP)
    without_correlations = 0
    for b, band in enumerate(BANDS):
        c = array_column(table, cols[f"{band}_coefficients"], path)
        e = array_column(table, cols[f"{band}_coefficient_errors"], path)
        present = np.isfinite(c)
        # Every present value needs a finite positive error; a zero or negative one is a damaged
        # file, not a measurement, so stop rather than guess.
        bad = present & ~(np.isfinite(e) & (e > 0))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise DataFileError(path, f"{int(bad.sum())} present coefficients have a zero, negative or missing "
                                f"error (first: row {i}, source_id {source_id[i]}, coefficient {j}: {e[i, j]})",
                                column=cols[f"{band}_coefficient_errors"])
        partial = present.any(1) & ~present.all(1)
        if partial.any():
            i = int(np.argmax(partial))
            raise DataFileError(path, f"row {i} (source_id {source_id[i]}) has only some of its 55 coefficients",
                                column=cols[f"{band}_coefficients"])
        has_band = present.all(1)
        coeff[has_band, b], coeff_err[has_band, b] = c[has_band], e[has_band]
        name = f"{band}_coefficient_correlations"
        ok = np.zeros(n, bool)
        if name in cols:
            r = array_column(table, cols[name], path, length=None)
            if r.shape[1] == corr.shape[2]:
                ok = has_band & np.isfinite(r).all(1)
                corr[ok, b] = r[ok]
        without_correlations += int((has_band & ~ok).sum())
        if truncate:
            n_relevant[:, b] = _relevant_in_file(table, cols, band, ~has_band, path)

    g, g_err, origin = _g_magnitudes(table, cols, path, source_id, g_mag, coeff, coeff_err, corr)
    g_err = np.where(np.isfinite(g) & ~(np.isfinite(g_err) & (g_err > 0)), vocab["g"].assumed_error, g_err)
    no_g = ~np.isfinite(g)
    if no_g.any():
        warnings.warn(f"{path}: {int(no_g.sum())} of {n} stars have no G magnitude; their XP tokens are left "
                      "missing (see table.meta['blanked'])", stacklevel=2)
    values, errors = coefficients_to_tokens(coeff, coeff_err, g, corr, n_relevant if truncate else None)
    band_missing = np.isnan(coeff[:, :, 0])
    return _xp_token_table(vocab, values, errors, g, g_err, origin, source_id, meta={
        "name": "gaia_xp_continuous",
        "source": "Gaia DR3 XP_CONTINUOUS (Gaia archive DataLink)",
        "file": str(path),
        "missing": {"bp_band": int(band_missing[:, 0].sum()), "rp_band": int(band_missing[:, 1].sum()),
                    "both_bands": int(band_missing.all(1).sum())},
        "bands_without_correlations": without_correlations,
        "truncated_to_n_relevant_bases": bool(truncate),
        "blanked": {"xp_no_g_magnitude": int((no_g & ~band_missing.all(1)).sum())},
    })


def _xp_token_table(vocab: Vocabulary, values: np.ndarray, errors: np.ndarray, g: np.ndarray, g_err: np.ndarray,
                    origin: np.ndarray, source_id: np.ndarray, meta: dict) -> TokenTable:
    """The TokenTable both XP readers return: the XP tokens, ``g``, and where each G came from."""
    cols = dict(zip(XP_NAMES, values.T))
    errs = dict(zip(XP_NAMES, errors.T))
    cols["g"], errs["g"] = g, np.where(np.isfinite(g), g_err, np.nan)
    _, n_seen = np.unique(source_id, return_counts=True)
    meta = {**meta, "stars": len(source_id),
            "g_source": {o: int((origin == o).sum()) for o in G_ORIGINS},
            "g_source_per_star": [str(o) for o in origin],
            "duplicate_source_id_rows": int((n_seen - 1).sum()),
            "normalisation": "XP flux in 6 nm bins scaled to G = 15, in 1e-17 W m^-2 nm^-1 (xp_basis)"}
    star_id = np.array([f"Gaia DR3 {s}" for s in source_id], dtype=object)
    return TokenTable.from_columns(vocab, cols, errs, source_id=source_id, star_id=star_id, meta=meta)


def read_xp_sampled(path: str | Path, g_mag: Sequence[float] | np.ndarray | Mapping[int, float] | None = None,
                    *, source_id: int | None = None, vocab: Vocabulary | None = None) -> TokenTable:
    """Read Gaia XP sampled spectra into a TokenTable: the archive's ``XP_SAMPLED`` DataLink product
    (one star per file: columns ``wavelength``, ``flux``, ``flux_error``; the source id from the
    file's metadata or its DataLink name) or a table of gaiaxpy ``calibrate`` output (one star per row: ``source_id``
    and array columns ``flux``, ``flux_error``), on gaiaxpy's default grid (336-1020 nm, 2 nm).

    ``g_mag`` as in :func:`read_xp_continuous` (no ``"synthetic"``: use the continuous file for
    that); the file's ``phot_g_mean_mag`` is used where it has one.

    Example
    -------
    >>> from stellarlm.data.gaia_xp import astroquery_example_files
    >>> t = read_xp_sampled(astroquery_example_files()["XP_SAMPLED"]["fits"], g_mag=[13.871])
    >>> round(float(t.column("xp_638")[0]), 2)
    2.83
    """
    path = Path(path)
    return sampled_table_to_tokens(_read_any_table(path), path, g_mag, source_id=source_id, vocab=vocab)


def sampled_table_to_tokens(table: Table, path: str | Path,
                            g_mag: Sequence[float] | np.ndarray | Mapping[int, float] | None = None,
                            *, source_id: int | None = None, vocab: Vocabulary | None = None) -> TokenTable:
    """The work of :func:`read_xp_sampled` on an astropy Table already in memory (``path`` names the
    file in messages, and gives the source id of a DataLink product that has none inside)."""
    cols = _column_lookup(table)
    for c in ("flux", "flux_error"):
        if c not in cols:
            raise DataFileError(path, "required column missing from the XP_SAMPLED file", column=c)
    if "wavelength" in cols:  # DataLink: one star, one row per wavelength
        wave = float_column(table, cols["wavelength"], path)
        if len(wave) != len(XP_WAVELENGTH_NM) or not np.allclose(wave, XP_WAVELENGTH_NM):
            raise DataFileError(path, f"expected gaiaxpy's default sampling ({len(XP_WAVELENGTH_NM)} points, "
                                "336-1020 nm in 2 nm steps)", column=cols["wavelength"])
        flux = float_column(table, cols["flux"], path)[None]
        ferr = float_column(table, cols["flux_error"], path)[None]
        sid = source_id if source_id is not None else _meta_source_id(table, path)
        ids = np.array([sid], dtype=np.int64)
        one_row = table[:1]
    else:
        if "source_id" not in cols:
            raise DataFileError(path, "required column missing from the sampled-spectra table", column="source_id")
        flux = array_column(table, cols["flux"], path, length=len(XP_WAVELENGTH_NM))
        ferr = array_column(table, cols["flux_error"], path, length=len(XP_WAVELENGTH_NM))
        ids = _source_ids(table, cols["source_id"], path)
        one_row = table
    bad = np.isfinite(flux) & ~(np.isfinite(ferr) & (ferr > 0))
    if bad.any():
        raise DataFileError(path, f"{int(bad.sum())} flux samples have a zero, negative or missing error",
                            column=cols["flux_error"])
    g, g_err, origin = _g_magnitudes(one_row, _column_lookup(one_row), path, ids, g_mag)
    vocab = vocab or Vocabulary.default()
    g_err = np.where(np.isfinite(g) & ~(np.isfinite(g_err) & (g_err > 0)), vocab["g"].assumed_error, g_err)
    values, errors = sampled_to_tokens(flux, ferr, g)
    return _xp_token_table(vocab, values, errors, g, g_err, origin, ids, meta={
        "name": "gaia_xp_sampled", "source": "Gaia DR3 XP_SAMPLED (or gaiaxpy calibrate)", "file": str(path),
        "blanked": {"xp_no_g_magnitude": int((~np.isfinite(g)).sum())}})


def _meta_source_id(table: Table, path: Path) -> int:
    for key in ("source_id", "SOURCE_ID", "SOURCEID"):
        if key in table.meta:
            return int(table.meta[key])
    # FITS: the id is in the HDU's EXTNAME or a header card; VOTable: in the name of the table
    for key, value in table.meta.items():
        if "source" in key.lower() and str(value).strip().isdigit():
            return int(value)
    # CSV carries no metadata; DataLink names its files "XP_SAMPLED-Gaia DR3 <source_id>.<ext>"
    import re

    found = re.search(r"Gaia (?:DR3|EDR3) (\d+)", Path(path).name)
    if found:
        return int(found.group(1))
    raise DataFileError(path, "no source id in the file's metadata or name; pass source_id=")


def astroquery_example_files() -> dict[str, dict[str, Path]]:
    """The one real Gaia DR3 star (source_id 5937083312263887616) that the installed astroquery
    ships in its test data, as ``{product: {format: path}}`` for the products XP_CONTINUOUS,
    XP_SAMPLED and MCMC_MSC in csv, ecsv, fits and vot. The zips are unpacked once into
    ``$STELLARLM_DATA`` (default ``./data``) ``/astroquery_example/``.

    Raises DataFileError when astroquery or its test data is not installed.
    """
    import importlib.util
    import zipfile

    from .embedded import cache_dir

    spec = importlib.util.find_spec("astroquery")
    if spec is None or not spec.submodule_search_locations:
        raise DataFileError("<package astroquery>", "astroquery is not installed")
    src = Path(list(spec.submodule_search_locations)[0]) / "gaia" / "tests" / "data"
    out = cache_dir() / "astroquery_example"
    files: dict[str, dict[str, Path]] = {}
    for fmt in ("csv", "ecsv", "fits", "vot"):
        zips = sorted(src.glob(f"gaia_dr3_source_id_*_dl_products_{fmt}.zip"))
        if not zips:
            raise DataFileError(src, f"astroquery's example Gaia DR3 products ({fmt}) are not installed")
        target = out / fmt
        if not target.exists():
            tmp = out / f".{fmt}.tmp{os.getpid()}"
            with zipfile.ZipFile(zips[0]) as z:
                z.extractall(tmp)
            tmp.replace(target)
        for f in sorted(target.iterdir()):
            product = f.name.split("-", 1)[0]
            files.setdefault(product, {})[fmt] = f
    return files


def _relevant_in_file(table: Table, cols: dict[str, str], band: str, band_missing: np.ndarray,
                      path: str | Path) -> np.ndarray:
    """The file's ``<band>_n_relevant_bases`` (n,); a star without the band may have no count."""
    name = f"{band}_n_relevant_bases"
    if name not in cols:
        raise DataFileError(path, "truncate=True needs the number of relevant bases", column=name)
    n = np.where(band_missing, N_XP, float_column(table, cols[name], path))
    try:
        return relevant_bases_counts(n, len(n))
    except ValueError as exc:
        raise DataFileError(path, f"{name} {exc}", column=cols[name]) from exc
