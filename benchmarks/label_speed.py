"""Speed and memory of ``stellarlm label`` on generated Gaia bulk XP files, before and after issue 30.

    python benchmarks/label_speed.py [--rows 1000000] [--rank-rows 250000] [--component-rows 20000]
                                     [--model DIR] [--dir /tmp/...] [--skip-before] [--skip-one-process]

1. writes bulk files in the archive's format (:func:`stellarlm.data.gaia_bulk.write_bulk_file`:
   the astroquery star with noise, ~40 kB of text a star, gzip level 1): ``--component-rows`` stars
   for the per-stage split, ``--rows`` for the one-process run, ``--rank-rows`` per rank, and a
   photometry join file (source_id, phot_g_mean_mag);
2. then twice, "before" (zlib's gunzip, pandas' number parser, 2048-star model batches with the
   whole batch's per-token embedding at once: ``BEFORE_ENV`` and ``_as_before``) and "after"
   (today's defaults), each in fresh processes on the same files:
   - the CPU time of each stage on one thread, each stage run on its own over the component file:
     decompress (+ the input's sha256), parse (text -> floats, on the gunzipped copy), tokens
     (coefficients -> tokens + the G join), model, write (the FITS output);
   - end to end, one process on the 2 cores (``--threads 1``: the model in the main thread,
     parsing in reader threads): wall time, stars/s, peak RSS (``wait4``);
   - two ranks (RANK/WORLD_SIZE as torchrun sets them), each pinned to one core with ``taskset``,
     each labelling its own ``--rank-rows`` file: aggregate stars/s and peak RSS per rank;
3. with ``--converted``: the rank files converted to FITS (``stellarlm convert``, one process per
   core) and labelled again from the FITS by two ranks, the rate of a second pass over a survey.

Writes ``benchmarks/results/label_speed.json``. ``--model``: a trained model directory; without
it an untrained model of the default configuration is made (the JSON says which was used). The
big files go to ``--dir`` (default /tmp/stellarlm_label_bench) and are deleted afterwards unless
``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _untrained_default(directory: Path) -> Path:
    import torch

    from stellarlm.model import ModelConfig, StellarTransformer
    from stellarlm.training import TrainConfig, save_model
    from stellarlm.vocab import Vocabulary

    if (directory / "model.safetensors").exists():
        return directory
    torch.manual_seed(0)
    vocab = Vocabulary.default()
    t = TrainConfig()
    cfg = ModelConfig(n_vocab=len(vocab), patch_of=vocab.patches(t.patch_size, t.lamost_patch_size))
    save_model(directory, StellarTransformer(cfg), vocab, {"note": "untrained, default configuration: timing only"})
    return directory


def _photometry(path: Path, first: int, n: int) -> None:
    rng = np.random.default_rng(1)
    g = rng.uniform(9, 17.5, n)
    ids = np.arange(first, first + n)
    with open(path, "w") as f:
        f.write("source_id,phot_g_mean_mag\n")
        for a in range(0, n, 100_000):
            f.write("".join(f"{i},{x:.5f}\n" for i, x in zip(ids[a:a + 100_000], g[a:a + 100_000])))


_LOGS = {}


def _run(cmd: list[str], env: dict, cpus: str | None = None) -> subprocess.Popen:
    """Start a child with its output in files (a pipe could fill up while we wait4 on it)."""
    import tempfile

    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus] + cmd
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
    _LOGS[p.pid] = (out, err)
    return p


def _wait(procs: list[subprocess.Popen]) -> list[dict]:
    """Wait for each process: exit status, peak RSS (MB) and the JSON it printed last."""
    out = []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        files = _LOGS.pop(p.pid)
        for f in files:
            f.seek(0)
        stdout, stderr = files[0].read(), files[1].read()
        lines = [x for x in stdout.splitlines() if x.startswith("{")]
        out.append({"rc": p.returncode, "peak_rss_mb": usage.ru_maxrss / 1024,
                    "result": json.loads(lines[-1]) if lines else None, "stderr_tail": stderr[-2000:]})
    return out


# "before": the reader and the model as they were before issue 30 (zlib's gunzip, pandas' number
# parser, 2048-star model batches, the per-token embedding of a whole batch at once)
BEFORE_ENV = {"STELLARLM_FAST_PARSE": "0", "STELLARLM_ISAL": "0"}


def _as_before(before: bool) -> int | None:
    """In a child: the model's batch as before issue 30 (``before``) or today's default."""
    from stellarlm.survey import FixedInputEncoder

    if not before:
        return None
    FixedInputEncoder.CPU_EMBED_ROWS = 1 << 30
    return 2048


def worker(args) -> None:
    """Child: label the inputs and print the per-file results as JSON."""
    from stellarlm.survey import label_files

    batch = _as_before(args.before)
    t = time.perf_counter()
    res = label_files(args.inputs, args.model, args.out, want=["teff", "logg", "m_h"], photometry=[args.phot],
                      threads=1, progress=False, amp=True if args.bf16 else None, parse_threads=args.parse_threads,
                      batch_size=batch)
    print(json.dumps({"wall_s": time.perf_counter() - t, "files": [r.__dict__ for r in res]}))


def components(args) -> None:
    """Child: CPU seconds of each stage of labelling the ``--inputs`` file, one thread, each stage
    run on its own over the whole file: gunzip (+ the input's sha256), text -> floats (on the
    gunzipped copy), coefficients -> tokens (+ the G join), the model, the FITS output."""
    import torch

    from stellarlm.data.gaia_bulk import HashingReader, bulk_rows, iter_xp_chunks, open_text_stream
    from stellarlm.data.xp_basis import coefficients_to_tokens
    from stellarlm.survey import Labeller, Photometry, _write_fits
    from stellarlm.vocab import Vocabulary

    torch.set_num_threads(1)
    batch = _as_before(args.before)
    cpu = time.thread_time  # this thread's CPU time: numba, pandas and torch all run in it here
    path = Path(args.inputs[0])
    coefficients_to_tokens(np.zeros((1, 2, 55)), np.ones((1, 2, 55)), np.array([15.0]))  # design matrix: once
    sec = {}
    plain = Path(args.out) / path.name.removesuffix(".gz")
    t = cpu()
    raw = HashingReader(path)  # hashed as it is read, and read in blocks, as in stellarlm label
    with open_text_stream(path, raw) as f, open(plain, "wb") as g:
        for block in iter(lambda: f.read(1 << 20), b""):
            g.write(block)
    raw.close()
    sec["decompress"] = cpu() - t
    # the parser's first call loads its compiled code (once a process, not once a file): not timed
    tiny = Path(args.out) / "XpContinuousMeanSpectrum_warm.csv"
    head, rows = bulk_rows(4)
    tiny.write_bytes(head + b"".join(rows))
    list(iter_xp_chunks(tiny, 1024))
    t = cpu()
    chunks = list(iter_xp_chunks(plain, 1024))
    sec["parse"] = cpu() - t
    plain.unlink()
    n = sum(len(c) for c in chunks)
    phot = Photometry([args.phot])
    assumed_g_err = Vocabulary.default()["g"].assumed_error
    t = cpu()
    toks = []
    for c in chunks:
        g, ge = phot.lookup(c.source_id)
        ge = np.where(np.isfinite(ge) & (ge > 0), ge, assumed_g_err)  # as stellarlm label does
        v, e = coefficients_to_tokens(c.coefficients, c.errors, g, c.correlations)
        toks.append((np.column_stack([v, g]), np.column_stack([e, ge])))
    sec["tokens"] = cpu() - t
    lab = Labeller(args.model, ["teff", "logg", "m_h"], batch_size=batch)
    lab.columns(*toks[0])  # first call: allocations, oneDNN kernels
    t = cpu()
    answers = [lab.columns(v, e) for v, e in toks]
    sec["model"] = cpu() - t
    cols = {"source_id": [c.source_id for c in chunks]}
    for k in answers[0]:
        cols[k] = [a[k] for a in answers]
    t = cpu()
    _write_fits(Path(args.out) / "components.labels.fits", cols, {}, lab)
    sec["write"] = cpu() - t
    total = sum(sec.values())
    print(json.dumps({"stars": n, "cpu_s": sec, "cpu_ms_per_star": {k: 1e3 * v / n for k, v in sec.items()},
                      "share": {k: v / total for k, v in sec.items()},
                      "stars_per_s_per_core": n / total,
                      "teff_first": float(answers[0]["teff"][0])}))


def _phase(args, me, env, model, work, files, before: bool) -> dict:
    """Components, the one-process run and the two-rank run, with the reader and model of today
    or of ``before`` issue 30."""
    env = {**env, **BEFORE_ENV} if before else env
    flag = ["--before"] if before else []
    extra = flag + (["--bf16"] if args.bf16 else [])
    tag = "before" if before else "after"
    phot = str(files["phot"])
    out = {}
    scratch = work / f"components_{tag}"
    scratch.mkdir(exist_ok=True)
    if args.skip_components:
        comp = {"result": "skipped"}
    else:
        comp = _wait([_run(me + ["--components", "--inputs", str(files["small"]), "--model", str(model), "--phot", phot,
                                 "--out", str(scratch)] + flag, env)])[0]
    out["components_one_thread"] = comp["result"] or comp
    print(tag, "components:", out["components_one_thread"], flush=True)

    if not args.skip_one_process:
        out1 = work / f"out_1proc_{tag}"
        shutil.rmtree(out1, ignore_errors=True)
        r = _wait([_run(me + ["--worker", "--inputs", str(files["big"]), "--model", str(model), "--phot", phot,
                              "--out", str(out1), "--parse-threads", str(args.parse_threads)] + extra, env)])[0]
        if r["result"]:
            f = r["result"]["files"][0]
            r["stars"] = f["stars"]
            r["stars_per_s"] = f["stars"] / r["result"]["wall_s"]
            r["reader_thread_busy_s"], r["model_thread_busy_s"] = f["parse_seconds"], f["model_seconds"]
        out["one_process_2_cores"] = r
        print(tag, "1 process:", {k: v for k, v in r.items() if k != "result"}, flush=True)

    if not args.skip_ranks:
        out2 = work / f"out_2ranks_{tag}"
        shutil.rmtree(out2, ignore_errors=True)
        t = time.perf_counter()
        procs = [_run(me + ["--worker", "--inputs", *map(str, files["ranks"]), "--model", str(model), "--phot", phot,
                            "--out", str(out2), "--parse-threads", "1"] + extra,
                      {**env, "RANK": str(k), "WORLD_SIZE": "2"}, cpus=str(k))
                 for k in range(2)]
        rr = _wait(procs)
        wall = time.perf_counter() - t
        stars = sum(f["stars"] for x in rr if x["result"] for f in x["result"]["files"])
        out["two_ranks_1_core_each"] = {"ranks": rr, "stars": stars, "wall_s": wall, "stars_per_s": stars / wall,
                                        "peak_rss_mb_per_rank": [x["peak_rss_mb"] for x in rr]}
        print(tag, "2 ranks:", stars, "stars", stars / wall, "stars/s", flush=True)
    return out


def _converted(args, me, env, model, work, files) -> dict:
    """The rank files converted to FITS, two processes, one core each; then the 2-rank labelling of
    the FITS files, today's code (the second pass over a survey)."""
    from stellarlm.data import xp_fits

    fits_dir = work / "fits"
    shutil.rmtree(fits_dir, ignore_errors=True)
    t = time.perf_counter()
    procs = [_run([sys.executable, "-m", "stellarlm.cli", "convert", str(p), "--out", str(fits_dir)], env,
                  cpus=str(k)) for k, p in enumerate(files["ranks"])]
    conv = _wait(procs)
    wall = time.perf_counter() - t
    stars = 2 * args.rank_rows
    converted = [fits_dir / xp_fits.output_name(p) for p in files["ranks"]]
    out = {"convert": {"procs": conv, "wall_s": wall, "stars_per_s": stars / wall,
                       "fits_bytes_per_star": sum(p.stat().st_size for p in converted) / stars,
                       "text_gz_bytes_per_star": sum(p.stat().st_size for p in files["ranks"]) / stars}}
    print("convert:", {k: v for k, v in out["convert"].items() if k != "procs"}, flush=True)
    quick = argparse.Namespace(**{**vars(args), "skip_one_process": True, "skip_components": True})
    out["label_fits"] = _phase(quick, me, env, model, work, {**files, "ranks": converted}, before=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the one-process run's file")
    ap.add_argument("--rank-rows", type=int, default=250_000, help="rows of each rank's file in the 2-rank run")
    ap.add_argument("--component-rows", type=int, default=20_000, help="rows of the per-stage measurement")
    ap.add_argument("--model", help="trained model directory (default: an untrained default-size model)")
    ap.add_argument("--dir", default="/tmp/stellarlm_label_bench")
    ap.add_argument("--out-json", default=str(ROOT / "benchmarks" / "results" / "label_speed.json"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--bf16", action="store_true", help="end-to-end runs with bf16 autocast on CPU")
    ap.add_argument("--skip-ranks", action="store_true")
    ap.add_argument("--skip-one-process", action="store_true")
    ap.add_argument("--skip-before", action="store_true", help="today's reader and model only")
    ap.add_argument("--parse-threads", type=int, default=2, help="reader threads of the one-process run")
    ap.add_argument("--converted", action="store_true", help="then convert the rank files to FITS (stellarlm "
                    "convert, one process per core) and label those with 2 ranks: the rate of a second pass")
    ap.add_argument("--skip-components", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--components", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--phot", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.components:
        return components(args)

    from stellarlm.data.fast_floats import available
    from stellarlm.data.gaia_bulk import write_bulk_file

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else _untrained_default(work / "untrained_default")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    me = [sys.executable, str(Path(__file__).resolve())]
    try:
        import isal  # noqa: F401
        has_isal = True
    except ImportError:
        has_isal = False
    report = {"model": str(model), "model_note": json.loads((model / "model.json").read_text()).get("note", "trained"),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "after_has": {"numba_parser": available(), "isal": has_isal},
              "rows": args.rows, "rank_rows": args.rank_rows, "component_rows": args.component_rows}

    t = time.perf_counter()
    # the row count in each name: a file kept (--keep) from a run of another size is not reused
    files = {"small": work / f"XpContinuousMeanSpectrum_components_{args.component_rows}.csv.gz",
             "big": work / f"XpContinuousMeanSpectrum_bench_{args.rows}.csv.gz",
             "ranks": [work / f"XpContinuousMeanSpectrum_rank{k}_{args.rank_rows}.csv.gz" for k in range(2)],
             "phot": work / "GaiaSource_bench.csv"}
    first = {"small": 10**15, "big": 10**15, "ranks": [10**15 + args.rows + k * args.rank_rows for k in range(2)]}
    if not files["small"].exists():
        write_bulk_file(files["small"], args.component_rows, first_source_id=first["small"], seed=7)
    if not args.skip_one_process and not files["big"].exists():
        write_bulk_file(files["big"], args.rows, first_source_id=first["big"])
    if not args.skip_ranks:
        for k, p in enumerate(files["ranks"]):
            if not p.exists():
                write_bulk_file(p, args.rank_rows, first_source_id=first["ranks"][k], seed=k + 1)
    _photometry(files["phot"], 10**15, args.rows + 2 * args.rank_rows)
    report["generate_s"] = time.perf_counter() - t
    report["file_bytes"] = {k: (v.stat().st_size if isinstance(v, Path) and v.exists() else None)
                            for k, v in files.items() if k != "ranks"}
    print(f"wrote the inputs in {report['generate_s']:.0f} s", flush=True)

    for before in ((False,) if args.skip_before else (True, False)):
        report["before" if before else "after"] = _phase(args, me, env, model, work, files, before)

    if args.converted:
        report["converted"] = _converted(args, me, env, model, work, files)

    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out_json}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
