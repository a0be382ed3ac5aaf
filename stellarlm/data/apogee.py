"""APOGEE DR17 ``allStar`` catalogue (FITS) -> TokenTable of labels, photometry and extinction.

Tokens: ``teff``, ``logg``, ``m_h``, ``alpha_m`` (ASPCAP calibrated labels with their errors),
``j``, ``h``, ``k`` (2MASS, with errors), ``g``, ``bp``, ``rp`` (Gaia EDR3, assumed errors) and
``a_k`` (``AK_TARG``, assumed error). Photometry columns the file lacks are left out of the table.

Quality handling (every blanked value is counted by reason in ``table.meta["blanked"]``; no star
is dropped):

* ``-9999`` sentinels and NaN are missing;
* ``ASPCAPFLAG`` bit 23 ``STAR_BAD`` blanks all four labels of that star;
* a present label whose error is zero, negative or not finite is blanked;
* a magnitude outside a plausible range (``99.999``-style sentinels) or, where the file has an
  error column, without a valid error (2MASS upper limits) is blanked;
* ``AK_TARG`` outside (-0.3, 3.0) mag is a failed RJCE estimate and is blanked.

Example
-------
The DR17 file (4 GB, from the SDSS science archive) is not available to the doctests, so this is
skipped; :func:`read_allstar` shows the same on a small file it writes.

>>> from stellarlm.data.apogee import read_allstar
>>> table = read_allstar("allStar-dr17-synspec_rev1.fits")  # doctest: +SKIP
>>> table.meta["blanked"]["teff"]                           # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataFileError
from ..integrity import check_gzip
from ..vocab import Vocabulary
from .table import TokenTable

STAR_BAD_BIT = 23  # ASPCAPFLAG bit: the star's ASPCAP fit is unreliable (DR17 bitmask docs)
SENTINEL_BELOW = -9000.0  # APOGEE writes -9999 (and -9999.99) for "no value"
MAG_VALID = (-5.0, 40.0)  # mag; outside this a magnitude is a placeholder (99.999, 999, -9999)
AK_VALID = (-0.3, 3.0)  # mag; same range as stellarlm.data.embedded: AK_TARG values down to -86 occur

# token -> (value column, error column)
LABEL_COLUMNS = {"teff": ("TEFF", "TEFF_ERR"), "logg": ("LOGG", "LOGG_ERR"), "m_h": ("M_H", "M_H_ERR"),
                 "alpha_m": ("ALPHA_M", "ALPHA_M_ERR")}
# token -> (value column, error column or None = use the token's assumed error)
PHOT_COLUMNS = {"g": ("GAIAEDR3_PHOT_G_MEAN_MAG", None), "bp": ("GAIAEDR3_PHOT_BP_MEAN_MAG", None),
                "rp": ("GAIAEDR3_PHOT_RP_MEAN_MAG", None), "j": ("J", "J_ERR"), "h": ("H", "H_ERR"),
                "k": ("K", "K_ERR")}
REQUIRED_COLUMNS = ("APOGEE_ID", "ASPCAPFLAG") + tuple(c for pair in LABEL_COLUMNS.values() for c in pair)


def _is_sentinel(v: np.ndarray) -> np.ndarray:
    return ~np.isfinite(v) | (v <= SENTINEL_BELOW)


def read_allstar(path: str | Path, hdu: int | str = 1, *, vocab: Vocabulary | None = None) -> TokenTable:
    """Read an APOGEE DR17 allStar FITS file into a TokenTable.

    Parameters
    ----------
    path : ``allStar-dr17-synspec_rev1.fits`` or any FITS table with the same column names (case
        does not matter). Only the needed columns are read, through a memory map, so the 4 GB DR17
        file does not have to fit in memory.
    hdu : the table's HDU (index or name); 1 in the DR17 file.
    vocab : vocabulary of the table (default: :meth:`Vocabulary.default`).

    Returns
    -------
    TokenTable, one row per file row (duplicated APOGEE_IDs, e.g. a star observed from both
    telescopes, are kept and counted in ``meta["duplicate_apogee_id_rows"]``). ``source_id`` is
    ``GAIAEDR3_SOURCE_ID`` (-1 where 0 or missing), ``star_id`` is ``APOGEE_ID``.

    Raises
    ------
    DataFileError
        naming the file (and the column): unreadable or not FITS, no such HDU, the HDU is not a
        table, or a required column (APOGEE_ID, ASPCAPFLAG, the four labels and their errors) is
        missing.

    Example
    -------
    A two-star file with the DR17 column names: the second star has ``STAR_BAD`` set and a 2MASS
    ``J`` of 99.999 (no measurement).

    >>> from astropy.table import Table
    >>> from stellarlm.data.apogee import read_allstar
    >>> Table({"APOGEE_ID": ["2M00000002+7417074", "2M00000019-1924498"], "ASPCAPFLAG": [0, 1 << 23],
    ...        "TEFF": [4750.0, 5100.0], "TEFF_ERR": [80.0, 90.0], "LOGG": [2.6, 3.5], "LOGG_ERR": [0.05, 0.05],
    ...        "M_H": [-0.2, 0.1], "M_H_ERR": [0.01, 0.01], "ALPHA_M": [0.1, 0.0], "ALPHA_M_ERR": [0.02, 0.02],
    ...        "J": [10.2, 99.999], "J_ERR": [0.02, -9999.0]}).write("allStar-tiny.fits")
    >>> t = read_allstar("allStar-tiny.fits")
    >>> t
    TokenTable(2 stars x 5 tokens; train/val/test = 2/0/0; 50.0% missing)
    >>> t.column("teff"), t.column("j")
    (array([4750.,   nan], dtype=float32), array([10.2,  nan], dtype=float32))
    >>> t.meta["blanked"]["teff"]["star_bad"], t.meta["blanked"]["j"]["implausible_magnitude"]
    (1, 1)
    """
    from astropy.io import fits

    path = Path(path)
    vocab = vocab or Vocabulary.default()
    if not path.exists():
        raise DataFileError(path, "no such file")
    check_gzip(path)  # astropy may stop before the CRC at the end of a damaged stream
    try:
        hdul = fits.open(path, memmap=True)
    except Exception as exc:  # astropy raises OSError/ValueError/... for a damaged file
        raise DataFileError(path, f"not a readable FITS file ({type(exc).__name__}: {exc})") from exc
    with hdul:
        try:
            table_hdu = hdul[hdu]
        except (IndexError, KeyError) as exc:
            raise DataFileError(path, f"no HDU {hdu!r} (the file has {len(hdul)})", column=None) from exc
        if not isinstance(table_hdu, fits.BinTableHDU):
            raise DataFileError(path, f"HDU {hdu!r} is not a binary table ({type(table_hdu).__name__})")
        try:
            data = table_hdu.data
            names = {c.upper(): c for c in table_hdu.columns.names}
        except Exception as exc:
            raise DataFileError(path, f"HDU {hdu!r}: unreadable table ({type(exc).__name__}: {exc})") from exc
        for c in REQUIRED_COLUMNS:
            if c not in names:
                raise DataFileError(path, "required column missing from the allStar table", column=c)

        def col(name: str, dtype=np.float64) -> np.ndarray:
            # np.array copies out of the memory map, so the arrays outlive the open file
            try:
                return np.array(data[names[name]], dtype=dtype)
            except Exception as exc:
                raise DataFileError(path, f"cannot read the column ({type(exc).__name__}: {exc})",
                                    column=name) from exc

        apogee_id = np.array([s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s)
                              for s in data[names["APOGEE_ID"]]], dtype=object)
        apogee_id = np.array([s.strip() for s in apogee_id], dtype=object)
        n = len(apogee_id)
        aspcapflag = col("ASPCAPFLAG", np.int64)
        labels = {t: (col(v), col(e)) for t, (v, e) in LABEL_COLUMNS.items()}
        phot = {t: (col(v), col(e) if e is not None and e in names else None)
                for t, (v, e) in PHOT_COLUMNS.items() if v in names}
        ak = col("AK_TARG") if "AK_TARG" in names else None
        if "GAIAEDR3_SOURCE_ID" in names:
            sid = np.array(data[names["GAIAEDR3_SOURCE_ID"]], dtype=np.int64)
        else:
            sid = np.zeros(n, dtype=np.int64)

    source_id = np.where(sid > 0, sid, -1)
    star_bad = ((aspcapflag >> STAR_BAD_BIT) & 1).astype(bool)
    values: dict[str, np.ndarray] = {}
    errors: dict[str, np.ndarray] = {}
    blanked: dict[str, dict[str, int]] = {}

    for token, (v, e) in labels.items():
        missing = _is_sentinel(v)
        v = np.where(missing, np.nan, v)
        e = np.where(_is_sentinel(e), np.nan, e)
        present = np.isfinite(v)
        # STAR_BAD: ASPCAP itself says the fit failed, so none of the star's labels is a measurement.
        bad_star = present & star_bad
        # A label with no usable error cannot be weighted in a loss; missing is the honest value.
        bad_err = present & ~bad_star & ~(np.isfinite(e) & (e > 0))
        drop = bad_star | bad_err
        values[token] = np.where(drop, np.nan, v)
        errors[token] = np.where(drop | ~present, np.nan, e)
        blanked[token] = {"missing_in_file": int(missing.sum()), "star_bad": int(bad_star.sum()),
                          "bad_error": int(bad_err.sum())}

    for token, (v, e) in phot.items():
        missing = _is_sentinel(v)
        v = np.where(missing, np.nan, v)
        implausible = np.isfinite(v) & ((v < MAG_VALID[0]) | (v > MAG_VALID[1]))
        v = np.where(implausible, np.nan, v)
        counts = {"missing_in_file": int(missing.sum()), "implausible_magnitude": int(implausible.sum())}
        if e is None:
            err = np.full(n, vocab[token].assumed_error)
        else:
            # 2MASS gives no error for an upper limit: such a magnitude is not a measurement.
            no_err = np.isfinite(v) & ~(np.isfinite(e) & (e > 0) & ~_is_sentinel(e))
            v = np.where(no_err, np.nan, v)
            err = e
            counts["no_valid_error"] = int(no_err.sum())
        values[token] = v
        errors[token] = np.where(np.isfinite(v), err, np.nan)
        blanked[token] = counts

    if ak is not None:
        missing = _is_sentinel(ak)
        ak = np.where(missing, np.nan, ak)
        outside = np.isfinite(ak) & ((ak < AK_VALID[0]) | (ak > AK_VALID[1]))
        values["a_k"] = np.where(outside, np.nan, ak)
        errors["a_k"] = np.full(n, vocab["a_k"].assumed_error)
        blanked["a_k"] = {"missing_in_file": int(missing.sum()), "outside_valid_range": int(outside.sum())}

    _, n_seen = np.unique(apogee_id, return_counts=True)
    order = [t.name for t in vocab.tokens if t.name in values]  # vocabulary order, whatever the file had
    meta = {
        "name": "apogee_dr17_allstar",
        "source": "APOGEE DR17 allStar",
        "file": str(path),
        "hdu": hdu,
        "stars": n,
        "star_bad": int(star_bad.sum()),
        "no_gaia_source_id": int((source_id < 0).sum()),
        "duplicate_apogee_id_rows": int((n_seen - 1).sum()),
        "absent_columns": [c for t, (c, _) in PHOT_COLUMNS.items() if t not in phot]
                          + ([] if ak is not None else ["AK_TARG"]),
        "blanked": blanked,
    }
    return TokenTable.from_columns(vocab, {k: values[k] for k in order}, {k: errors[k] for k in order},
                                   source_id=source_id, star_id=apogee_id, meta=meta)
