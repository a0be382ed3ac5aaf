"""Label a whole survey: stream XP spectra from many files through a model, one output per input.

:func:`label_files` (and ``stellarlm label``) reads each input in chunks
(:func:`stellarlm.data.gaia_bulk.iter_xp_chunks`: Gaia bulk ``XpContinuousMeanSpectrum_*.csv.gz``,
DataLink ``XP_CONTINUOUS`` products, FITS/ECSV/CSV/VOTable/Parquet tables of coefficients or of
``xp_*`` tokens), turns the coefficients into XP tokens as every reader does
(:func:`stellarlm.data.xp_basis.coefficients_to_tokens`), asks the model for
the wanted names and writes ``<input stem>.labels.fits`` into the output directory.

* **Output format: FITS** (astropy, already a dependency; Parquet would need pyarrow, which is not
  installed here and is a 40 MB wheel for a table of a dozen columns). The header carries the
  provenance: ``STLMVER`` (stellarlm version), ``MODELSHA`` (sha256 of ``model.safetensors``),
  ``INPUTSHA`` (sha256 of the input file as stored), ``INPUT``, ``MODEL``, ``WANT``, ``NSTARS`` and
  the count of each G source.
* **Atomic and resumable**: an output is written under a temporary name and renamed when complete,
  so an output that exists is finished; a rerun skips it (if its ``MODELSHA`` is the model's) and
  redoes from scratch any input whose output is missing, deleting its stale temporary file.
* **Failures**: an input that fails (unreadable, malformed row: the reason names the line) is
  logged to ``<out>/label.log`` and stderr, and the run goes on; the return value (the CLI's exit
  status, capped at 100) counts them.
* **Scale out**: under ``torchrun --nproc-per-node N`` (or any launcher that sets ``RANK`` and
  ``WORLD_SIZE``), each rank takes a deterministic share of the inputs (largest first, each to the
  least-loaded rank; ties by name), so the ranks together write every output once. No
  torch.distributed group is needed: the ranks never talk.
* **GPU**: ``device="cuda"`` uses GPU ``LOCAL_RANK`` modulo the number of GPUs (several parsing
  ranks share one), bf16 autocast, pinned host memory and
  non-blocking copies, large batches, and optionally ``torch.compile`` (``compile=True``).

G comes, per star and in this order, from the input's own column (``phot_g_mean_mag``,
``phot_g_mean_flux`` or ``g``), from the ``photometry`` join files (by source_id), or, with
``synthetic_g=True``, from the spectrum itself (gaiaxpy); the ``g_source`` column says which
(``column``, ``photometry``, ``synthetic`` or ``none``; a star without G gets NaN labels).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.xp_basis import coefficients_to_tokens
from .errors import BadValueError, DataFileError, StellarLMError
from .integrity import sha256_file
# the model step has its own module; its names stay importable from here
from .labeller import FixedInputEncoder, Labeller  # noqa: F401

G_SOURCES = ("column", "photometry", "synthetic", "none")
OUTPUT_SUFFIX = ".labels.fits"
LOG_NAME = "label.log"
_INPUT_ENDINGS = (".csv.gz", ".ecsv.gz", ".csv", ".ecsv", ".fits.gz", ".fits", ".fit", ".fts", ".xml", ".vot",
                  ".votable", ".parquet", ".pq")

log = logging.getLogger("stellarlm.label")


def check_chunk(chunk, path) -> None:
    """The checks :func:`stellarlm.data.gaia_xp.read_xp_continuous` makes, per row: a band is all
    there or all missing, and every present coefficient has a finite positive error. Raises
    DataFileError naming the line."""
    if chunk.coefficients is None:
        return
    present = np.isfinite(chunk.coefficients)
    partial = present.any(2) & ~present.all(2)
    bad_err = present & ~(np.isfinite(chunk.errors) & (chunk.errors > 0))
    bad = partial.any(1) | bad_err.any((1, 2))
    if bad.any():
        i = int(np.argmax(bad))
        line = int(chunk.extra.get("line", np.arange(len(chunk)) + chunk.first_line)[i])
        what = ("has only some of a band's 55 coefficients" if partial[i].any()
                else "has a present coefficient with a zero, negative or missing error")
        raise DataFileError(path, f"line {line} (source_id {chunk.source_id[i]}) {what}")


# --- G by source_id -------------------------------------------------------------------------------------
class Photometry:
    """G magnitudes by source_id from one or more tables (e.g. Gaia's ``GaiaSource_*.csv.gz``):
    ``source_id`` and ``phot_g_mean_mag`` (optionally ``phot_g_mean_mag_error``, or the flux and
    its error); held as sorted arrays, 24 bytes a star."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        ids, gs, errs = [], [], []
        for p in paths:
            i, g, e = _read_photometry(Path(p))
            ids.append(i), gs.append(g), errs.append(e)
        sid = np.concatenate(ids) if ids else np.empty(0, np.int64)
        order = np.argsort(sid, kind="stable")
        self.source_id, self.g, self.g_err = sid[order], np.concatenate(gs)[order], np.concatenate(errs)[order]

    def lookup(self, source_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = np.searchsorted(self.source_id, source_id)
        k = np.minimum(k, max(len(self.source_id) - 1, 0))
        found = (self.source_id[k] == source_id) if len(self.source_id) else np.zeros(len(source_id), bool)
        return np.where(found, self.g[k] if len(self.g) else np.nan, np.nan), \
            np.where(found, self.g_err[k] if len(self.g) else np.nan, np.nan)


def _read_photometry(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from .data.gaia_xp import GAIA_G_ZEROPOINT_ERROR
    from .vocab import GAIA_G_ZEROPOINT

    if not path.exists():
        raise DataFileError(path, "no such photometry file")
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".csv", ".ecsv")):
        import pandas as pd

        try:
            head = pd.read_csv(path, comment="#", nrows=0)
            cols = {c.lower(): c for c in head.columns}
            use = [cols[c] for c in ("source_id", "phot_g_mean_mag", "phot_g_mean_mag_error", "phot_g_mean_flux",
                                     "phot_g_mean_flux_error") if c in cols]
            frame = pd.read_csv(path, comment="#", usecols=use, dtype={cols.get("source_id", "source_id"): "int64"},
                                na_values=["null", ""], keep_default_na=True)
        except (ValueError, OSError, KeyError) as exc:
            raise DataFileError(path, f"cannot read the photometry table ({exc})") from exc
        get = lambda c: frame[cols[c]].to_numpy(dtype=np.float64) if c in cols else None  # noqa: E731
        if "source_id" not in cols:
            raise DataFileError(path, "required column missing", column="source_id")
        sid = frame[cols["source_id"]].to_numpy(dtype=np.int64)
    else:
        from .data.gaia_xp import _column_lookup, _read_any_table, _source_ids, float_column

        table = _read_any_table(path)
        cols = _column_lookup(table)
        if "source_id" not in cols:
            raise DataFileError(path, "required column missing", column="source_id")
        sid = _source_ids(table, cols["source_id"], path)
        get = lambda c: float_column(table, cols[c], path) if c in cols else None  # noqa: E731
    g, g_err = get("phot_g_mean_mag"), get("phot_g_mean_mag_error")
    flux, flux_err = get("phot_g_mean_flux"), get("phot_g_mean_flux_error")
    if g is None and flux is None:
        raise DataFileError(path, "neither phot_g_mean_mag nor phot_g_mean_flux", column="phot_g_mean_mag")
    n = len(sid)
    g = np.full(n, np.nan) if g is None else g
    g_err = np.full(n, np.nan) if g_err is None else g_err
    if flux is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            use = ~np.isfinite(g) & (flux > 0)
            g = np.where(use, GAIA_G_ZEROPOINT - 2.5 * np.log10(flux), g)
            if flux_err is not None:
                fe = np.hypot(2.5 / np.log(10) * flux_err / flux, GAIA_G_ZEROPOINT_ERROR)
                g_err = np.where(~np.isfinite(g_err), fe, g_err)
    return sid, g, g_err


# --- ranks and names -------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment torchrun (or SLURM, or by hand) sets; (0, 1) alone."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world:
        raise BadValueError(f"RANK {rank} is not in 0..WORLD_SIZE-1 ({world})")
    return rank, world


def assign(inputs: Sequence[Path], world: int) -> list[list[Path]]:
    """Deterministic share of the inputs per rank: largest first, each to the least-loaded rank
    (ties: lower rank), inputs of equal size by name. Every rank computes the same answer."""
    sizes = {p: (p.stat().st_size if p.exists() else 0) for p in inputs}
    shares: list[list[Path]] = [[] for _ in range(world)]
    load = [0] * world
    for p in sorted(inputs, key=lambda p: (-sizes[p], str(p))):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(p)
        load[r] += max(sizes[p], 1)
    return shares


def output_name(path: Path) -> str:
    from .data.gaia_bulk import strip_ending

    return strip_ending(path.name, _INPUT_ENDINGS) + OUTPUT_SUFFIX


# --- one input ---------------------------------------------------------------------------------------------
@dataclass
class FileResult:
    input: str
    output: str
    status: str  # "done", "skipped", "failed"
    stars: int = 0
    seconds: float = 0.0
    parse_seconds: float = 0.0
    model_seconds: float = 0.0
    reason: str = ""
    g_source: dict = field(default_factory=dict)


def _finished(out: Path, model_sha: str) -> bool:
    if not out.exists():
        return False
    try:
        from astropy.io import fits

        return fits.getheader(out, 1).get("MODELSHA") == model_sha
    except Exception:  # unreadable: redo it
        return False


def _producer(path: Path, chunk_rows: int, photometry: Photometry | None, synthetic_g: bool, q: queue.Queue,
              stop: threading.Event, hasher: list, timing: dict, parse_threads: int = 1) -> None:
    """Read, check and tokenise chunks of ``path`` into ``q`` (a thread: parsing and token maths
    release the GIL, so they overlap the model); ends with None, or the exception."""
    from .data.gaia_bulk import iter_xp_chunks
    from .data.gaia_xp import synthetic_g as _synthetic_g
    from .vocab import Vocabulary

    assumed_g_err = Vocabulary.default()["g"].assumed_error
    try:
        t0 = time.perf_counter()
        for chunk in iter_xp_chunks(path, chunk_rows, hasher=hasher, workers=parse_threads):
            if stop.is_set():
                return
            check_chunk(chunk, path)
            n = len(chunk)
            g = chunk.g.copy() if chunk.g is not None else np.full(n, np.nan)
            g_err = chunk.g_error.copy() if chunk.g_error is not None else np.full(n, np.nan)
            origin = np.where(np.isfinite(g), 0, 3).astype(np.int8)
            if photometry is not None and (origin == 3).any():
                pg, pe = photometry.lookup(chunk.source_id)
                use = (origin == 3) & np.isfinite(pg)
                g[use], g_err[use], origin[use] = pg[use], pe[use], 1
            if synthetic_g and chunk.coefficients is not None and (origin == 3).any():
                todo = (origin == 3) & np.isfinite(chunk.coefficients[:, :, 0]).all(1)
                if todo.any():
                    corr = chunk.correlations if chunk.correlations is not None else np.zeros((n, 2, 1485))
                    sg, se = _synthetic_g(chunk.source_id[todo], chunk.coefficients[todo], chunk.errors[todo],
                                          np.nan_to_num(corr[todo]))
                    g[todo], g_err[todo], origin[todo] = sg, se, 2
            g_err = np.where(np.isfinite(g) & ~(np.isfinite(g_err) & (g_err > 0)), assumed_g_err, g_err)
            if chunk.tokens is not None:
                values, errors = chunk.tokens
            else:
                values, errors = coefficients_to_tokens(chunk.coefficients, chunk.errors, g, chunk.correlations)
            vals = np.column_stack([values, g])
            errs = np.column_stack([errors, np.where(np.isfinite(g), g_err, np.nan)])
            t1 = time.perf_counter()
            timing["parse"] += t1 - t0
            q.put((chunk.source_id, vals, errs, g, origin))
            t0 = time.perf_counter()
        q.put(None)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which reports it
        q.put(exc)


def label_one(path: Path, out_dir: Path, labeller: Labeller, *, chunk_rows: int = 1024,
              photometry: Photometry | None = None, synthetic_g: bool = False, progress: bool = True,
              position: int = 0, parse_threads: int = 1, _stop_after_chunks: int | None = None) -> FileResult:
    """Label one input into ``out_dir/<stem>.labels.fits`` (atomically). Raises on failure."""
    from tqdm import tqdm

    out = out_dir / output_name(path)
    tmp = out_dir / f".{out.name}.tmp"
    t_start = time.perf_counter()
    q: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()
    hasher: list = []
    timing = {"parse": 0.0}
    worker = threading.Thread(target=_producer, args=(path, chunk_rows, photometry, synthetic_g, q, stop, hasher,
                                                      timing, parse_threads), daemon=True)
    worker.start()
    cols: dict[str, list] = {}
    model_s = 0.0
    size = max(path.stat().st_size, 1)
    bar = tqdm(desc=path.name[:40], unit="star", unit_scale=True, disable=not progress, position=position,
               leave=True, dynamic_ncols=True, mininterval=1.0)
    n_chunks = 0
    try:
        pending, done = [], False
        while not done:
            # gather chunks up to a model batch (GPU batches are much larger than a chunk)
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                done = True
            else:
                pending.append(item)
            if not pending or (not done and sum(len(p[0]) for p in pending) < labeller.batch_size):
                continue
            sid, vals, errs, g, origin = (np.concatenate(x) for x in zip(*pending))
            pending = []
            t0 = time.perf_counter()
            answer = labeller.columns(vals, errs)
            model_s += time.perf_counter() - t0
            for k, v in {"source_id": sid, **answer, "g": g.astype(np.float32), "g_source": origin}.items():
                cols.setdefault(k, []).append(v)
            bar.update(len(sid))
            if hasher:  # ETA: stars so far scaled by the fraction of the file read
                frac = min(hasher[0].bytes_read / size, 1.0)
                if frac > 0:
                    bar.total = max(int(bar.n / frac), bar.n)
            n_chunks += 1
            if _stop_after_chunks is not None and n_chunks >= _stop_after_chunks:
                # tests: a kill in the middle of a file leaves a half-written temporary file
                _write_fits(tmp, cols, {})
                raise KeyboardInterrupt("simulated kill")
    finally:
        stop.set()
        bar.close()
        while worker.is_alive():  # unblock a producer waiting on a full queue, then let it end
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
    worker.join()
    input_sha = hasher[0].digest if hasher and hasher[0].digest else sha256_file(path)
    n = int(sum(len(x) for x in cols.get("source_id", [])))
    counts = {}
    if n:
        origin = np.concatenate(cols["g_source"])
        counts = {s: int((origin == i).sum()) for i, s in enumerate(G_SOURCES)}
    from . import __version__

    header = {"STLMVER": (__version__, "stellarlm version"),
              "MODELSHA": (labeller.model_sha256, ""),
              "MODEL": (str(labeller.model_dir), ""),
              "INPUTSHA": (input_sha, ""),
              "INPUT": (str(path), ""),
              "WANT": (" ".join(labeller.want), "labelled names"),
              "NSTARS": (n, "rows"),
              **{f"G_{s.upper()[:6]}": (c, f"stars whose G came from: {s}") for s, c in counts.items()}}
    _write_fits(tmp, cols, header, labeller)
    os.replace(tmp, out)
    return FileResult(str(path), str(out), "done", n, time.perf_counter() - t_start, timing["parse"], model_s,
                      g_source=counts)


def _write_fits(path: Path, cols: dict[str, list], header: dict, labeller: Labeller | None = None) -> None:
    from astropy.io import fits

    arrays = {k: (np.concatenate(v) if v else np.empty(0)) for k, v in cols.items()}
    columns = []
    for k, a in arrays.items():
        if k == "source_id":
            columns.append(fits.Column(name=k, format="K", array=a.astype(np.int64)))
        elif k == "g_source":
            names = np.array(G_SOURCES, dtype="S10")[a.astype(int)] if a.size else np.empty(0, "S10")
            columns.append(fits.Column(name=k, format="10A", array=names))
        else:
            unit = None
            if labeller is not None:
                base = k.split("_q")[0].removesuffix("_err")
                if base in labeller.lm.vocab:
                    unit = labeller.lm.vocab[base].unit or None
            columns.append(fits.Column(name=k, format="E", array=a.astype(np.float32), unit=unit))
    hdu = fits.BinTableHDU.from_columns(columns, name="LABELS")
    for key, (value, comment) in header.items():
        hdu.header[key] = (value, comment)
    with open(path, "wb") as f:
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(f)
        f.flush()
        os.fsync(f.fileno())


# --- the run ---------------------------------------------------------------------------------------------
def rank_device(device: str, local_rank: str | None, n_gpus: int) -> str:
    """The device of a labelling rank: plain ``cuda`` under torchrun means GPU ``LOCAL_RANK``
    modulo the number of GPUs, so more ranks than GPUs share them (parsing, not the model, sets
    the pace: one GPU fed by 14 parsing ranks in docs/survey_scale.md).

    >>> rank_device("cuda", "13", 8)
    'cuda:5'
    """
    if device != "cuda" or local_rank is None or n_gpus < 1:
        return device
    return f"cuda:{int(local_rank) % n_gpus}"


def label_files(inputs: Sequence[str | os.PathLike], model: str | os.PathLike, out_dir: str | os.PathLike, *,
                want: Sequence[str] = ("teff", "logg", "m_h"), photometry: Sequence[str | os.PathLike] = (),
                synthetic_g: bool = False, quantiles: Sequence[float] = (), threads: int | None = None,
                batch_size: int | None = None, device: str = "cpu", compile: bool = False,
                chunk_rows: int = 1024, progress: bool = True, rank: int | None = None,
                world_size: int | None = None, amp: bool | None = None, parse_threads: int = 1
                ) -> list[FileResult]:
    """Label every input (this rank's share of them) into ``out_dir``; see the module doc.

    Returns one :class:`FileResult` per input of this rank (``status`` done, skipped or failed,
    with the reason); a failure is logged and the run goes on."""
    import torch

    env_rank, env_world = rank_and_world()
    rank = env_rank if rank is None else rank
    world = env_world if world_size is None else world_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in inputs]
    names = [output_name(p) for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadValueError(f"inputs would write the same output {dup[:3]}: rename them or label them separately")
    if threads:
        torch.set_num_threads(int(threads))
    if device == "cuda" and torch.cuda.is_available():
        device = rank_device(device, os.environ.get("LOCAL_RANK"), torch.cuda.device_count())
    _setup_log(out_dir, rank)
    labeller = Labeller(model, want, device=device, batch_size=batch_size, quantiles=quantiles, compile=compile,
                        amp=amp)
    phot = Photometry(photometry) if photometry else None
    mine = assign(paths, world)[rank]
    results = []
    for path in mine:
        out = out_dir / output_name(path)
        tmp = out_dir / f".{out.name}.tmp"
        if _finished(out, labeller.model_sha256):
            results.append(FileResult(str(path), str(out), "skipped"))
            continue
        if tmp.exists():
            log.info("rank %d: %s was half done; starting it again", rank, path)
            tmp.unlink()
        try:
            res = label_one(path, out_dir, labeller, chunk_rows=chunk_rows, photometry=phot,
                            synthetic_g=synthetic_g, progress=progress, position=rank if world > 1 else 0,
                            parse_threads=parse_threads)
            log.info("rank %d: %s -> %s: %d stars in %.1f s (%.0f stars/s)", rank, path, out.name, res.stars,
                     res.seconds, res.stars / max(res.seconds, 1e-9))
        except (StellarLMError, OSError, ValueError, RuntimeError, MemoryError) as exc:
            if tmp.exists():
                tmp.unlink()
            log.error("rank %d: FAILED %s: %s", rank, path, exc)
            res = FileResult(str(path), str(out), "failed", reason=str(exc))
        results.append(res)
    return results


def _setup_log(out_dir: Path, rank: int) -> None:
    if getattr(_setup_log, "_dir", None) == (out_dir, rank):
        return
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    fh = logging.FileHandler(out_dir / LOG_NAME)
    fh.setFormatter(fmt)
    log.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.WARNING)
    sh.setFormatter(fmt)
    log.addHandler(sh)
    log.propagate = False
    _setup_log._dir = (out_dir, rank)


# --- command line ------------------------------------------------------------------------------------
def add_label_command(sub) -> None:
    """``stellarlm label``: registered on the CLI's subparsers by :mod:`stellarlm.cli`."""
    p = sub.add_parser("label", help="label survey files (Gaia bulk XP, DataLink XP_CONTINUOUS, tables): one "
                       "FITS output per input, resumable; under torchrun each rank takes a share of the inputs")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files (XpContinuousMeanSpectrum_*.csv.gz, ...)")
    p.add_argument("--model", required=True, help="model directory (model.safetensors + model.json)")
    p.add_argument("--out", required=True, help="output directory: <input stem>.labels.fits per input, label.log")
    p.add_argument("--want", nargs="+", default=["teff", "logg", "m_h"], help="names to predict")
    p.add_argument("--photometry", nargs="*", default=[], help="tables with source_id and phot_g_mean_mag "
                   "(e.g. GaiaSource_*.csv.gz) for stars whose input has no G")
    p.add_argument("--synthetic-g", action="store_true", help="compute G from the spectrum (gaiaxpy) where no "
                   "other G is known (slow: ~1 ms a star)")
    p.add_argument("--quantiles", nargs="*", type=float, default=[], help="quantiles of each answer to write "
                   "(e.g. 0.16 0.5 0.84): columns <name>_q16 ...")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=None, help="stars per model batch (default 512 CPU, 32768 GPU)")
    p.add_argument("--chunk-rows", type=int, default=1024, help="rows read and parsed at a time")
    p.add_argument("--parse-threads", type=int, default=1, help="threads parsing text chunks at once (bulk files; "
                   "the parser releases the GIL): 2 on a 2-core machine with --threads 1")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: GPU LOCAL_RANK modulo the GPU count)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (on by default on CUDA); "
                   "~1.5x faster on CPUs with AVX512-BF16, answers differ by bf16 rounding")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU runs of many files)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_label_command)


def _label_command(args) -> int:
    results = label_files(args.inputs, args.model, args.out, want=args.want, photometry=args.photometry,
                          synthetic_g=args.synthetic_g, quantiles=args.quantiles, threads=args.threads,
                          batch_size=args.batch_size, device=args.device, compile=args.compile,
                          chunk_rows=args.chunk_rows, progress=not args.no_progress,
                          amp=True if args.bf16 else None, parse_threads=args.parse_threads)
    done = [r for r in results if r.status == "done"]
    failed = [r for r in results if r.status == "failed"]
    stars = sum(r.stars for r in done)
    secs = sum(r.seconds for r in done)
    rank, world = rank_and_world()
    print(f"rank {rank}/{world}: {len(done)} labelled ({stars} stars, {stars / max(secs, 1e-9):.0f} stars/s), "
          f"{sum(r.status == 'skipped' for r in results)} already done, {len(failed)} failed"
          + "".join(f"\n  FAILED {r.input}: {r.reason}" for r in failed))
    return min(len(failed), 100)
