"""Reading a user's star table: columns -> named token values and errors, with units, masks and checks.

What every entry point reads a table of stars with (:meth:`StellarLM.query`, fine-tuning, ``stellarlm
query``/``finetune``/``similar``): an astropy Table (columns with units are converted to the token's
unit; an incompatible unit is an error), a pandas DataFrame or a dict of arrays; a column
``<token>_err`` is that token's uncertainty; a masked cell or NaN is "not observed"; an unknown name
is refused with suggestions, a value that cannot be an observation with the column and row named.

>>> from stellarlm.star_table import table_columns
>>> from stellarlm.vocab import Vocabulary
>>> values, errors, passthrough, n = table_columns({"teff": [5000.0], "teff_err": [80.0], "source_id": [7]},
...                                                Vocabulary.default())
>>> list(values), list(errors), list(passthrough), n
(['teff'], ['teff'], ['source_id'], 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import BadValueError, UnknownTokenError
from .vocab import Vocabulary

PASSTHROUGH = ("source_id", "star_id", "apogee_id", "designation", "split")


def token_of(column: str) -> str:
    """The token a column belongs to: ``teff`` for both ``teff`` and ``teff_err``."""
    return column[:-4] if column.endswith("_err") else column


def _unmasked(values) -> np.ndarray:
    """A plain array; masked entries (empty cells of a CSV or FITS table) become NaN, i.e. missing,
    rather than whatever fill value sits under the mask."""
    data, mask = _split_mask(values)
    data = np.atleast_1d(np.asarray(data))
    if mask is not None and data.dtype.kind in "fiu":
        data = data.astype(np.float64)
        data[np.broadcast_to(mask, data.shape)] = np.nan
    return data


def _split_mask(col):
    """``col`` without its mask, and the mask (None if it has none): a numpy masked array or
    astropy ``MaskedColumn`` (the data keeps its unit: the fill value sits under the mask), or an
    astropy ``Masked`` Quantity. Every path from a table to tokens goes through here, so that a
    masked cell stays missing whatever unit or fill value it has."""
    from astropy.utils.masked import Masked

    if isinstance(col, Masked):
        return col.unmasked, np.asarray(col.mask, dtype=bool)
    if np.ma.isMaskedArray(col):
        mask = np.ma.getmaskarray(col)
        if hasattr(col, "quantity"):  # MaskedColumn: keep it a Column, for its unit
            from astropy.table import Column

            return Column(col.data.data, unit=col.unit, copy=False), mask
        return np.ma.getdata(col), mask
    return col, None


def table_columns(observed, vocab: Vocabulary) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict, int]:
    """Split ``observed`` (an astropy Table, a pandas DataFrame or a dict of columns) into token
    values, token errors and pass-through columns, in the units of ``vocab``'s tokens; returns
    (values, errors, passthrough, n_rows). What :meth:`StellarLM.query` and fine-tuning read a
    table with: units converted, masked cells NaN, unknown names refused with suggestions."""
    from astropy.table import Table

    is_frame = hasattr(observed, "to_dict") and hasattr(observed, "columns")  # pandas DataFrame
    if not (isinstance(observed, (Table, Mapping)) or is_frame):
        raise TypeError(f"observed must be an astropy Table, a pandas DataFrame or a dict, not {type(observed)}")
    raw = {str(k): v for k, v in as_mapping(observed).items()}
    cols = {}
    for name, col in raw.items():
        token = token_of(name)
        if name in PASSTHROUGH or token not in vocab:
            cols[name] = _unmasked(getattr(col, "value", col))
        else:
            cols[name] = _token_values(name, token, col, vocab)
    if not cols:
        raise BadValueError("empty input: no columns given")
    lengths = {k: len(v) for k, v in cols.items()}
    n = next(iter(lengths.values()))
    if any(length != n for length in lengths.values()):
        raise BadValueError(f"columns have different lengths: {lengths}")
    if n == 0:
        raise BadValueError("empty input: no stars (rows) given")
    values, errors, passthrough = {}, {}, {}
    for name, col in cols.items():
        if name in PASSTHROUGH:
            passthrough[name] = col
            continue
        if col.ndim != 1:
            raise BadValueError(f"column {name!r} has shape {col.shape}; expected one value per star")
        base = token_of(name)
        if base not in vocab:
            raise UnknownTokenError(name, vocab.names + [f"{x}_err" for x in vocab.names])
        (errors if name.endswith("_err") else values)[base] = col
    for name in errors:
        if name not in values:
            raise BadValueError(f"error column '{name}_err' given without a '{name}' column")
    return values, errors, passthrough, n


def _token_values(column: str, token: str, col, vocab: Vocabulary) -> np.ndarray:
    """A token's column as float64 in the token's unit, NaN where masked. Complex, boolean and
    non-numeric columns are refused (a cast would drop the imaginary part or read True as 1)."""
    data, mask = _split_mask(col)
    kind = np.asarray(getattr(data, "value", data)).dtype.kind
    if kind == "O":  # e.g. a pandas column of Python floats: numeric if every cell converts
        try:
            data, kind = np.asarray(data, dtype=np.float64), "f"
        except (TypeError, ValueError):
            pass
    if kind not in "fiu":
        what = {"c": "complex", "b": "boolean"}.get(kind, f"not numeric (dtype {np.asarray(data).dtype})")
        raise BadValueError(f"column {column!r} is {what}; expected real numbers (NaN for 'not observed')")
    if getattr(data, "unit", None) is not None:
        data = _to_token_unit(column, token, data, vocab)
    # no copy of a float64 column without a mask: a large query holds its input once
    arr = np.atleast_1d(np.asarray(getattr(data, "value", data), dtype=np.float64))
    if mask is not None:
        arr = arr.copy()
        arr[np.broadcast_to(mask, arr.shape)] = np.nan
    return arr


def _to_token_unit(column: str, token: str, col, vocab: Vocabulary) -> np.ndarray:
    """``col`` (a Column or Quantity with a unit, no mask) as an array in the token's unit."""
    import astropy.units as u

    unit = vocab[token].unit
    target = u.Unit(unit) if unit else u.dimensionless_unscaled
    log_of = LOG_TOKENS.get(token)
    if log_of is not None and _log_unit_of(col.unit, log_of):
        # log10 of a quantity in its cgs unit, as astronomers write it: u.Dex(x, u.cm / u.s**2), or a
        # FITS TUNIT 'log(cm.s**-2)' (which astropy reads as an unrecognised unit); an error column
        # in such a unit is a difference in dex
        return np.asarray(getattr(col, "value", col), dtype=np.float64)
    try:
        q = col.quantity if hasattr(col, "quantity") else u.Quantity(col)
        return q.to_value(target)
    except u.UnitConversionError:
        raise BadValueError(f"column {column!r} has unit {col.unit}, which cannot be converted to "
                            f"{target} (token {token!r})") from None


def check_values(values: dict, errors: dict, vocab: Vocabulary) -> None:
    """Refuse, column by column (no (n_stars, n_tokens) copy), what cannot be an observation:
    an infinite value, a value outside the token's physical range (:meth:`Vocabulary.valid_range`),
    an uncertainty beside a value that is not > 0, infinite, or wider than that range. NaN is "not observed" (a NaN
    uncertainty: the typical one). The message names the column and the first bad row."""
    for name, v in values.items():
        lo, hi = vocab.valid_range(name)
        with np.errstate(invalid="ignore"):
            refuse(name, v, np.isinf(v), "is infinite; use NaN for 'not observed'")
            refuse(name, v, (v < lo) | (v > hi), f"lies outside the valid range of {name!r}, "
                    f"{lo:g} to {hi:g} {vocab[name].unit}; use NaN for 'not observed'")
            if name in errors:
                e = errors[name]
                given = np.isfinite(v) & ~np.isnan(e)
                refuse(f"{name}_err", e, given & ~(e > 0), "is not a positive uncertainty (negative, zero)")
                refuse(f"{name}_err", e, given & np.isinf(e), "is an infinite uncertainty; use NaN for "
                        "'unknown' (the typical error is assumed) or leave the value out")
                # wider than every possible value: no information, and it overflows the model units
                refuse(f"{name}_err", e, given & (e > hi - lo), f"is an uncertainty wider than the valid "
                        f"range of {name!r} ({hi - lo:g} {vocab[name].unit}); leave the value out")
    observed = np.zeros(len(next(iter(values.values()))), dtype=bool)
    for v in values.values():
        observed |= np.isfinite(v)
    if not observed.any():
        raise BadValueError("no star has any observed (non-NaN) token")


def read_star_table(path, format: str | None = None, keep: Sequence[str] = (), g_mag: float | None = None,
                    synthetic_g: bool = False, truncate: bool = False, keep_if_present: Sequence[str] = ()):
    """Read a table of stars from a file as ``stellarlm query --input`` does: a table whose columns
    are token names (+ ``name_err``) in any format astropy reads (FITS, ECSV, CSV, Parquet, ...;
    ``format`` if the extension does not say), or a Gaia archive XP file (XP_CONTINUOUS with
    ``bp_coefficients``, XP_SAMPLED with ``wavelength``/``flux``) turned into XP tokens + G by the
    same readers as the Python API; then ``source_id`` and ``g_source`` are kept, and the other
    columns named in ``keep`` (and those of ``keep_if_present`` that the file has) copied row for
    row. ``g_mag`` (one star) or ``synthetic_g``: G for an XP
    file that has none; ``truncate``: use each band's ``n_relevant_bases`` only.

    Returns (table, the names of the columns made from an XP file to keep). Raises
    :class:`DataFileError` naming the file for a file that is missing, damaged or lacks a ``keep`` column.
    """
    from pathlib import Path

    from astropy.table import Table

    from .data.gaia_xp import _column_lookup, sampled_table_to_tokens, xp_table_to_tokens
    from .errors import DataFileError
    from .integrity import check_gzip

    if not Path(path).exists():
        raise DataFileError(path, "no such file")
    check_gzip(path)  # a damaged .gz can otherwise decode to plausible numbers
    try:
        observed = Table.read(path, format=format) if format else Table.read(path)
    except Exception as exc:
        raise DataFileError(path, f"cannot read input table ({exc})") from exc
    missing = [c for c in keep if c not in observed.colnames]
    if missing:
        raise DataFileError(path, f"--keep {' '.join(missing)}: no such column (columns: "
                                  f"{', '.join(observed.colnames[:12])})")
    cols = _column_lookup(observed)
    g = "synthetic" if synthetic_g else (None if g_mag is None else [g_mag] * len(observed))
    if "bp_coefficients" in cols:
        tokens = xp_table_to_tokens(observed, path, g_mag=g, truncate=truncate)
    elif "wavelength" in cols and "flux" in cols:
        tokens = sampled_table_to_tokens(observed, path, g_mag=None if g is None else [g_mag])
    else:
        return observed, []
    table = tokens.to_table()
    table.remove_columns(["star_id", "split"])
    table["g_source"] = tokens.meta["g_source_per_star"]
    for c in [*keep, *(c for c in keep_if_present if c in observed.colnames and c not in keep)]:
        if c not in table.colnames:  # other columns of the archive file the user asked for, row for row
            if len(observed) != len(table):  # XP_SAMPLED: one star, a row per wavelength
                raise DataFileError(path, f"--keep {c}: an XP_SAMPLED file has one row per wavelength")
            table[c] = observed[c]
    return table, ["source_id", "g_source"]


def as_mapping(observed) -> dict:
    """The columns of an astropy Table, a DataFrame or a dict, as a dict (no copies)."""
    from astropy.table import Table

    if isinstance(observed, Table):
        return {name: observed[name] for name in observed.colnames}
    if hasattr(observed, "to_dict") and hasattr(observed, "columns"):
        return {str(c): observed[c].to_numpy() for c in observed.columns}
    return dict(observed)


def refuse(column: str, values: np.ndarray, bad: np.ndarray, problem: str) -> None:
    """BadValueError naming ``column`` and its first ``bad`` row, if there is one."""
    if bad.any():
        i = int(np.argmax(bad))
        raise BadValueError(f"column {column!r}, row {i}: {values[i]!r} {problem}"
                            + (f" ({int(bad.sum())} rows in all)" if bad.sum() > 1 else ""))


# Tokens that are log10 of a physical quantity (token unit "dex"), and that quantity's unit.
LOG_TOKENS = {"logg": "cm s-2"}


def _log_unit_of(unit, physical: str) -> bool:
    """Is ``unit`` log10 of exactly ``physical``: ``u.dex(u.cm / u.s**2)`` (a LogUnit), or text such as
    ``log(cm.s**-2)`` / ``dex(cm/s2)`` that astropy leaves unrecognised? Another scale (log of m s^-2)
    is not accepted here: it would shift every value."""
    import astropy.units as u

    target = u.Unit(physical)
    if isinstance(unit, u.LogUnit):
        return unit.physical_unit == target and unit.function_unit == u.dex
    text = str(unit).replace(" ", "")
    for prefix in ("log(", "log10(", "dex(", "[", "log", "dex"):
        if text.startswith(prefix):
            inner = text[len(prefix):].rstrip(")]")
            try:
                return u.Unit(inner.replace(".", " "), parse_strict="silent") == target
            except ValueError:
                return False
    return False
