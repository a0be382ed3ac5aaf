"""Gaia bulk XP text files converted once to binary FITS tables, so later passes skip the parsing.

A bulk ``XpContinuousMeanSpectrum_*.csv.gz`` holds ~40 kB of text a star, and turning that text
into numbers is a third of what ``stellarlm label`` spends on a star (docs/survey_scale.md). A
survey is labelled more than once (a new model, other names), so the parse can be paid once:
:func:`convert_xp_file` streams the file through the same reader the labeller uses and writes a
FITS binary table in the Gaia archive's own column layout (``source_id``, ``bp_coefficients``
``55D``, ``bp_coefficient_errors`` ``55D``, ``bp_coefficient_correlations`` ``1485D``,
``bp_n_relevant_bases``, the same for RP, and G where the input has it), 25.6 kB a star of
float64: the numbers the parser gave, to the bit, so labelling the FITS gives the labels of the
text file to the bit (tested). ``stellarlm label`` reads such a table memory-mapped, a chunk at a
time, like any FITS table of coefficients.

The table is written as it is read (one chunk in memory; the row count is filled in the header at
the end) under a temporary name and renamed when complete. Its header records the input's name
and sha256 (``INPUT``, ``INPUTSHA``, computed on the same single read) and ``NSTARS``.

Example
-------
>>> from stellarlm.data.xp_fits import convert_xp_file
>>> convert_xp_file("XpContinuousMeanSpectrum_000000-003111.csv.gz", "xp_fits/")  # doctest: +SKIP
ConvertResult(input='XpContinuousMeanSpectrum_000000-003111.csv.gz', output='xp_fits/XpContinuousMeanSpectrum_000000-003111.xp.fits', stars=..., seconds=...)

or ``stellarlm convert XpContinuousMeanSpectrum_*.csv.gz --out xp_fits/``, then
``stellarlm label xp_fits/*.xp.fits ...``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataFileError
from ..vocab import N_XP
from .gaia_bulk import BANDS, N_CORR, iter_xp_chunks, strip_ending

FITS_BLOCK = 2880
OUTPUT_SUFFIX = ".xp.fits"
_TEXT_ENDINGS = (".csv.gz", ".ecsv.gz", ".csv", ".ecsv")


@dataclass
class ConvertResult:
    input: str
    output: str
    stars: int
    seconds: float


def _row_dtype(with_g: bool) -> np.dtype:
    """One table row as FITS stores it (big-endian, columns in order, no padding)."""
    fields = [("source_id", ">i8")]
    for band in BANDS:
        fields += [(f"{band}_coefficients", ">f8", (N_XP,)), (f"{band}_coefficient_errors", ">f8", (N_XP,)),
                   (f"{band}_coefficient_correlations", ">f8", (N_CORR,)), (f"{band}_n_relevant_bases", ">f8")]
    if with_g:
        fields += [("phot_g_mean_mag", ">f8"), ("phot_g_mean_mag_error", ">f8")]
    return np.dtype(fields)


def _table_header(dtype: np.dtype, n_rows: int, extra: dict):
    """The binary-table header for ``n_rows`` rows of ``dtype`` (NAXIS2 is a fixed-width card, so
    the header has the same length whatever the count: it is written first and rewritten last)."""
    from astropy.io import fits

    columns = []
    for name in dtype.names:
        sub = dtype[name]
        width = int(np.prod(sub.shape)) if sub.shape else 1
        code = "K" if sub.base.kind == "i" else "D"
        columns.append(fits.Column(name=name, format=f"{width}{code}" if width > 1 else code,
                                   unit="mag" if name.startswith("phot_g") else None))
    hdu = fits.BinTableHDU.from_columns(columns, nrows=0, name="XP_CONTINUOUS")
    header = hdu.header
    if header["NAXIS1"] != dtype.itemsize:
        raise AssertionError(f"FITS row of {header['NAXIS1']} bytes, numpy row of {dtype.itemsize}")
    header["NAXIS2"] = n_rows
    for key, (value, comment) in extra.items():
        header[key] = (value, comment)
    return header


def output_name(path: Path) -> str:
    """``XpContinuousMeanSpectrum_000000-003111.csv.gz`` -> ``XpContinuousMeanSpectrum_000000-003111.xp.fits``."""
    return strip_ending(path.name, _TEXT_ENDINGS) + OUTPUT_SUFFIX


def convert_xp_file(path: str | os.PathLike, out_dir: str | os.PathLike, *, chunk_rows: int = 1024,
                    parse_threads: int = 1, overwrite: bool = False) -> ConvertResult:
    """Write ``out_dir/<stem>.xp.fits``: every row of the XP input ``path`` (a bulk file, gzipped or
    not, or any table of coefficients the labeller reads) as float64 coefficients, errors,
    correlations and, where the input has them, G. Returns the :class:`ConvertResult`.

    Raises :class:`DataFileError` for an unreadable input (naming the file and line, as the
    labeller does; no output is left), an input that holds XP tokens rather than coefficients, and
    an existing output unless ``overwrite``.
    """
    from astropy.io import fits

    from .. import __version__
    from ..integrity import sha256_file

    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / output_name(path)
    if out.exists() and not overwrite:
        raise DataFileError(out, "exists already (overwrite=True, or --overwrite, to replace it)")
    tmp = out_dir / f".{out.name}.tmp"
    t0 = time.perf_counter()
    hasher: list = []
    n = 0
    dtype = None

    def header(n_rows: int, input_sha: str):
        return _table_header(dtype, n_rows, {
            "STLMVER": (__version__, "stellarlm version"), "INPUT": (path.name, "converted from"),
            "INPUTSHA": (input_sha, ""), "NSTARS": (n_rows, "rows")}).tostring()

    try:
        with open(tmp, "wb") as f:
            fits.PrimaryHDU().writeto(f)
            header_at = f.tell()
            for chunk in iter_xp_chunks(path, chunk_rows, hasher=hasher, workers=parse_threads):
                if chunk.coefficients is None:
                    raise DataFileError(path, "holds XP tokens, not coefficients: nothing to convert (label it as it is)")
                if dtype is None:  # the first chunk decides whether the table has a G column
                    dtype = _row_dtype(chunk.g is not None)
                    placeholder = header(0, "0" * 64)  # same cards and widths as the final header
                    f.write(placeholder.encode("ascii"))
                rows = np.zeros(len(chunk), dtype)
                rows["source_id"] = chunk.source_id
                for b, band in enumerate(BANDS):
                    rows[f"{band}_coefficients"] = chunk.coefficients[:, b]
                    rows[f"{band}_coefficient_errors"] = chunk.errors[:, b]
                    rows[f"{band}_coefficient_correlations"] = (
                        chunk.correlations[:, b] if chunk.correlations is not None else np.nan)
                    rows[f"{band}_n_relevant_bases"] = (
                        chunk.n_relevant[:, b] if chunk.n_relevant is not None else np.nan)
                if "phot_g_mean_mag" in dtype.names:
                    rows["phot_g_mean_mag"] = chunk.g if chunk.g is not None else np.nan
                    rows["phot_g_mean_mag_error"] = chunk.g_error if chunk.g_error is not None else np.nan
                f.write(rows.tobytes())
                n += len(chunk)
            if dtype is None:
                raise DataFileError(path, "holds no stars: nothing to convert")
            f.write(b"\0" * (-(n * dtype.itemsize) % FITS_BLOCK))
            final = header(n, hasher[0].digest if hasher and hasher[0].digest else sha256_file(path))
            if len(final) != len(placeholder):
                raise AssertionError("the FITS header changed length")
            f.seek(header_at)
            f.write(final.encode("ascii"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return ConvertResult(str(path), str(out), n, time.perf_counter() - t0)


# --- command line ------------------------------------------------------------------------------------
def add_convert_command(sub) -> None:
    """``stellarlm convert``: registered on the CLI's subparsers by :mod:`stellarlm.cli`."""
    p = sub.add_parser("convert", help="convert Gaia bulk XP text files (XpContinuousMeanSpectrum_*.csv.gz) to "
                       "binary FITS tables once, so that later `stellarlm label` passes skip the parsing")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files (XpContinuousMeanSpectrum_*.csv.gz, ...)")
    p.add_argument("--out", required=True, help="output directory: <input stem>.xp.fits per input")
    p.add_argument("--chunk-rows", type=int, default=1024, help="rows read and parsed at a time")
    p.add_argument("--parse-threads", type=int, default=1, help="threads parsing text chunks at once")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.set_defaults(func=_convert_command)


def _convert_command(args) -> int:
    failed = 0
    for path in args.inputs:
        try:
            r = convert_xp_file(path, args.out, chunk_rows=args.chunk_rows, parse_threads=args.parse_threads,
                                overwrite=args.overwrite)
        except DataFileError as exc:
            failed += 1
            print(f"FAILED {path}: {exc}")
            continue
        print(f"{r.input} -> {r.output}: {r.stars} stars, {r.stars / max(r.seconds, 1e-9):.0f} stars/s")
    return min(failed, 100)
