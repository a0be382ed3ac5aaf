"""Downloading Gaia DR3 XP_CONTINUOUS spectra and G through astroquery into one file the reader reads.

astroquery is imported inside :func:`download_xp_continuous` only, so the rest of stellarlm works
offline; the tests give it a fake archive (``tests/test_readers.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadValueError, DataFileError
from ..vocab import N_XP
from .archive_tables import _column_lookup, array_column, float_column, table_format

if TYPE_CHECKING:
    from astropy.table import Table

# Ids per DataLink request: the archive caps the ids one request may name (5000 assumed here;
# lower it if the archive refuses a request).
DATALINK_MAX_IDS = 5000
# Ids per ADQL query: synchronous jobs return a limited number of rows (2000 for anonymous users)
# and a long IN (...) list makes a long request.
ADQL_MAX_IDS = 1000


def _chunks(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(ids), size):
        yield [int(x) for x in ids[i:i + size]]


def _tables_from_datalink(result: Mapping[str, Any]) -> list[Table]:
    """Flatten what ``Gaia.load_data`` returns (``{file name: [tables]}``) into astropy Tables.

    astroquery 0.4.11 gives lists of astropy Tables for CSV and FITS, lists of
    ``astropy.io.votable`` TableElements for VOTable (``.xml``), a bare Table for some JSON, and
    leaves other endings (ECSV) as the path of a file it has already deleted; hence this function
    handles the first three and the caller should ask for csv, fits or votable.
    """
    from astropy.table import Table

    out = []
    for key, value in result.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, Table):
                out.append(item)
            elif hasattr(item, "to_table"):  # astropy.io.votable TableElement
                out.append(item.to_table())
            elif isinstance(item, (str, Path)) and Path(item).exists():
                out.append(Table.read(str(item), format=table_format(item)))
            else:
                raise DataFileError(f"<Gaia DataLink product {key}>",
                                    f"cannot use what astroquery returned ({type(item).__name__}); "
                                    "ask for format='csv', 'fits' or 'votable'")
    return out


def _fixed_width_arrays(table: Table, path: str) -> None:
    """Turn every array column (string, object or fixed) into a fixed-width float column with NaN rows
    for missing arrays, so that all four output formats can store it and the tables can be stacked."""
    for name in list(table.colnames):
        low = name.lower()
        if not any(low.endswith(s) for s in ("_coefficients", "_coefficient_errors", "_coefficient_correlations")):
            continue
        # correlations: 55*54/2 = 1485 per band in DR3, but their width is not checked here (not used)
        length = None if low.endswith("_correlations") else N_XP
        table.replace_column(name, array_column(table, name, path, length=length))


def _write_xp_file(table: Table, path: Path) -> None:
    """Write ``table`` in the format that ``path``'s ending names, in a form read_xp_continuous reads."""
    fmt = table_format(path)
    out = table.copy(copy_data=False)
    if fmt == "ascii.csv":
        # CSV cannot hold array columns: write them as the archive does, "[v0, v1, ...]", and an
        # all-NaN row (missing band) as an empty field.
        for name in out.colnames:
            col = out[name]
            if col.ndim == 2:
                arr = np.asarray(col, dtype=np.float64)
                text = ["" if np.isnan(r).all() else "[" + ", ".join(repr(float(x)) for x in r) + "]" for r in arr]
                out.replace_column(name, np.array(text, dtype=object).astype(str))
    tmp = path.with_name(path.name + ".tmp" + "".join(path.suffixes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unit strings astropy cannot round-trip; they are not used
        out.write(str(tmp), format=fmt, overwrite=True)
    tmp.replace(path)


def download_xp_continuous(source_ids: Iterable[int], path: str | Path, *, data_release: str = "Gaia DR3",
                           transport_format: str = "csv", gaia_source_table: str = "gaiadr3.gaia_source",
                           overwrite: bool = False, verbose: bool = False) -> Path:
    """Download Gaia DR3 XP continuous spectra and G magnitudes into one file for
    :func:`read_xp_continuous`.

    The spectra come from the archive's DataLink service (``Gaia.load_data`` with
    ``retrieval_type="XP_CONTINUOUS"``, ``data_structure="COMBINED"``) in chunks of
    :data:`DATALINK_MAX_IDS` ids; G comes from an ADQL query on ``gaia_source_table``
    (``phot_g_mean_mag``, ``phot_g_mean_flux``, ``phot_g_mean_flux_error``), joined on
    ``source_id``. astroquery is imported here only, so the rest of stellarlm works offline.

    Parameters
    ----------
    source_ids : Gaia DR3 source ids (duplicates are fetched once).
    path : output file; its ending picks the format (``.csv``, ``.ecsv``, ``.fits``, ``.xml``);
        ``.fits`` or ``.ecsv`` is best for many stars.
    data_release : DataLink release name.
    transport_format : format astroquery downloads in: ``"csv"``, ``"fits"`` or ``"votable"``
        (astroquery 0.4.11 does not return ECSV products, it deletes them before returning).
    gaia_source_table : table queried for G.
    overwrite : replace ``path`` if it exists.
    verbose : passed to astroquery.

    Returns
    -------
    Path of the written file. Sources without XP spectra are simply absent from it (the archive
    returns no row for them); ``meta`` of the table read back tells how many stars it has.

    Example
    -------
    This needs the network (the Gaia archive), so the doctests skip it:

    >>> p = download_xp_continuous([5853498713190525696, 4472832130942575872], "xp.fits")  # doctest: +SKIP
    >>> t = read_xp_continuous(p)                                                           # doctest: +SKIP
    """
    from astropy.table import Table, vstack
    from astroquery.gaia import Gaia  # lazy: network client, only needed here

    path = Path(path)
    table_format(path)  # fail on an unsupported ending before any network traffic
    if path.name.lower().endswith(".gz"):
        raise BadValueError(f"{path}: write an uncompressed file (.csv, .ecsv, .fits or .xml)")
    if path.exists() and not overwrite:
        raise DataFileError(path, "file already exists; pass overwrite=True to replace it")
    if transport_format not in ("csv", "fits", "votable"):
        raise BadValueError(f"transport_format must be 'csv', 'fits' or 'votable', not {transport_format!r}")
    ids = list(dict.fromkeys(int(s) for s in source_ids))
    if not ids:
        raise BadValueError("download_xp_continuous: no source ids given")

    parts = []
    for chunk in _chunks(ids, DATALINK_MAX_IDS):
        # dump_to_file=False: astroquery then extracts the product to a temporary folder, reads
        # it into tables and deletes the folder (its output_file argument is ignored in 0.4.11).
        result = Gaia.load_data(ids=chunk, data_release=data_release, retrieval_type="XP_CONTINUOUS",
                                data_structure="COMBINED", format=transport_format, dump_to_file=False,
                                verbose=verbose)
        for t in _tables_from_datalink(result or {}):
            if "bp_coefficients" in _column_lookup(t):
                _fixed_width_arrays(t, "<Gaia DataLink XP_CONTINUOUS>")
                parts.append(t)
    if not parts:
        raise DataFileError("<Gaia DataLink XP_CONTINUOUS>",
                            f"the archive returned no XP continuous spectra for the {len(ids)} source ids")
    xp = vstack(parts, metadata_conflicts="silent") if len(parts) > 1 else parts[0]
    xp_cols = _column_lookup(xp)
    xp_ids = np.asarray(xp[xp_cols["source_id"]], dtype=np.int64)

    phot: dict[int, tuple[float, float, float]] = {}
    for chunk in _chunks([int(s) for s in xp_ids], ADQL_MAX_IDS):
        query = (f"SELECT source_id, phot_g_mean_mag, phot_g_mean_flux, phot_g_mean_flux_error "
                 f"FROM {gaia_source_table} WHERE source_id IN ({', '.join(str(s) for s in chunk)})")
        res = Gaia.launch_job(query, verbose=verbose).get_results()
        rc = _column_lookup(res)  # the archive may return SOURCE_ID in upper case
        sid = np.asarray(res[rc["source_id"]], dtype=np.int64)
        mag, flux, ferr = (float_column(res, rc[c], "<ADQL result>") for c in
                           ("phot_g_mean_mag", "phot_g_mean_flux", "phot_g_mean_flux_error"))
        for k, s in enumerate(sid):
            phot[int(s)] = (mag[k], flux[k], ferr[k])
    for j, name in enumerate(("phot_g_mean_mag", "phot_g_mean_flux", "phot_g_mean_flux_error")):
        col = np.array([phot.get(int(s), (math.nan,) * 3)[j] for s in xp_ids])
        if name in xp_cols:
            xp.remove_column(xp_cols[name])
        xp[name] = np.ma.masked_invalid(col)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_xp_file(Table(xp, masked=True), path)
    return path
