"""Speed and memory of ``stellarlm label`` on a generated Gaia bulk XP file (issue 18).

    python benchmarks/label_speed.py [--rows 1000000] [--rank-rows 250000] [--model DIR] [--dir /tmp/...]

1. writes ``XpContinuousMeanSpectrum_bench.csv.gz`` with ``--rows`` stars in the archive's bulk
   format (:func:`stellarlm.data.gaia_bulk.write_bulk_file`: the astroquery star with noise, ~40 kB
   of text a star, gzip level 1) and a photometry join file (source_id, phot_g_mean_mag);
2. components on 20,000 stars, one thread each: parsing alone (gunzip + text -> floats), the
   coefficients -> tokens step, the model alone (fp32 and bf16 autocast);
3. end to end, one process on the 2 cores (``--threads 1``: the model in the main thread, parsing
   in a reader thread), in a fresh process: wall time, stars/s, peak RSS (``wait4``);
4. two ranks (RANK/WORLD_SIZE as torchrun sets them), each pinned to one core with
   ``taskset``, each labelling its own ``--rank-rows`` file: aggregate stars/s and peak RSS.

Writes ``benchmarks/results/label_speed.json``. ``--model``: a trained model directory; without
it an untrained model of the default configuration is made (timing does not depend on the weights;
the JSON says which was used). The big files go to ``--dir`` (default /tmp/stellarlm_label_bench)
and are deleted afterwards unless ``--keep``.
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


def worker(args) -> None:
    """Child: label the inputs and print the per-file results as JSON."""
    from stellarlm.survey import label_files

    t = time.perf_counter()
    res = label_files(args.inputs, args.model, args.out, want=["teff", "logg", "m_h"], photometry=[args.phot],
                      threads=1, progress=False, amp=True if args.bf16 else None, parse_threads=args.parse_threads)
    print(json.dumps({"wall_s": time.perf_counter() - t, "files": [r.__dict__ for r in res]}))


def components(args) -> None:
    """Child: one-thread rates of each stage on the first rows of the file."""
    import torch

    from stellarlm.data.gaia_bulk import iter_xp_chunks
    from stellarlm.data.xp_basis import coefficients_to_tokens
    from stellarlm.survey import Labeller, Photometry

    torch.set_num_threads(1)
    n_max = args.n
    coefficients_to_tokens(np.zeros((1, 2, 55)), np.ones((1, 2, 55)), np.array([15.0]))  # design matrix: once
    t = time.perf_counter()
    chunks = []
    for c in iter_xp_chunks(args.inputs[0], 2048):
        chunks.append(c)
        if sum(len(x) for x in chunks) >= n_max:
            break
    parse = time.perf_counter() - t
    n = sum(len(c) for c in chunks)
    phot = Photometry([args.phot])
    t = time.perf_counter()
    toks = []
    for c in chunks:
        g, _ = phot.lookup(c.source_id)
        v, e = coefficients_to_tokens(c.coefficients, c.errors, g, c.correlations)
        toks.append((np.column_stack([v, g]), np.column_stack([e, np.full(len(g), 0.003)])))
    tok = time.perf_counter() - t
    out = {"stars": n, "parse_stars_per_s": n / parse, "tokens_stars_per_s": n / tok}
    answers = {}
    for amp in (False, True):
        lab = Labeller(args.model, ["teff", "logg", "m_h"], amp=amp)
        lab.columns(*toks[0])
        t = time.perf_counter()
        answers[amp] = [lab.columns(v, e) for v, e in toks]
        out[f"model_{'bf16' if amp else 'fp32'}_stars_per_s"] = n / (time.perf_counter() - t)
    for name in ("teff", "logg", "m_h"):  # what bf16 on the CPU changes
        d = np.concatenate([b[name] - a[name] for a, b in zip(answers[False], answers[True])])
        s = np.concatenate([a[f"{name}_err"] for a in answers[False]])
        out[f"bf16_minus_fp32_{name}"] = {"median_abs": float(np.nanmedian(np.abs(d))),
                                          "p99_abs": float(np.nanpercentile(np.abs(d), 99)),
                                          "median_abs_over_sigma": float(np.nanmedian(np.abs(d) / s))}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rank-rows", type=int, default=250_000, help="rows of each rank's file in the 2-rank run")
    ap.add_argument("--model", help="trained model directory (default: an untrained default-size model)")
    ap.add_argument("--dir", default="/tmp/stellarlm_label_bench")
    ap.add_argument("--out-json", default=str(ROOT / "benchmarks" / "results" / "label_speed.json"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--bf16", action="store_true", help="end-to-end runs with bf16 autocast on CPU")
    ap.add_argument("--skip-ranks", action="store_true")
    ap.add_argument("--parse-threads", type=int, default=2, help="reader threads of the one-process run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--components", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--phot", help=argparse.SUPPRESS)
    ap.add_argument("-n", type=int, default=20_000, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.components:
        return components(args)

    from stellarlm.data.gaia_bulk import write_bulk_file

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else _untrained_default(work / "untrained_default")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    me = [sys.executable, str(Path(__file__).resolve())]
    report = {"model": str(model), "model_note": json.loads((model / "model.json").read_text()).get("note", "trained"),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "rows": args.rows}

    big = work / "XpContinuousMeanSpectrum_bench.csv.gz"
    phot = work / "GaiaSource_bench.csv"
    t = time.perf_counter()
    if not big.exists():
        write_bulk_file(big, args.rows, first_source_id=10**15)
    _photometry(phot, 10**15, args.rows + 2 * args.rank_rows)
    report["generate_s"] = time.perf_counter() - t
    report["file_bytes"] = big.stat().st_size
    print(f"wrote {big} ({big.stat().st_size / 1e9:.1f} GB) in {report['generate_s']:.0f} s", flush=True)

    comp = _wait([_run(me + ["--components", "--inputs", str(big), "--model", str(model), "--phot", str(phot)],
                       env)])[0]
    report["components_one_thread"] = comp["result"] or comp
    print("components:", report["components_one_thread"], flush=True)

    out1 = work / "out_1proc"
    shutil.rmtree(out1, ignore_errors=True)
    extra = ["--bf16"] if args.bf16 else []
    r = _wait([_run(me + ["--worker", "--inputs", str(big), "--model", str(model), "--phot", str(phot), "--out",
                          str(out1), "--parse-threads", str(args.parse_threads)] + extra, env)])[0]
    if r["result"]:
        f = r["result"]["files"][0]
        r["stars"] = f["stars"]
        r["stars_per_s"] = f["stars"] / r["result"]["wall_s"]
        r["reader_thread_busy_s"], r["model_thread_busy_s"] = f["parse_seconds"], f["model_seconds"]
    report["one_process_2_cores"] = r
    print("1 process:", {k: v for k, v in r.items() if k != "result"}, flush=True)

    if not args.skip_ranks:
        files = []
        for k in range(2):
            p = work / f"XpContinuousMeanSpectrum_rank{k}.csv.gz"
            if not p.exists():
                write_bulk_file(p, args.rank_rows, first_source_id=10**15 + args.rows + k * args.rank_rows, seed=k + 1)
            files.append(p)
        out2 = work / "out_2ranks"
        shutil.rmtree(out2, ignore_errors=True)
        t = time.perf_counter()
        procs = [_run(me + ["--worker", "--inputs", *map(str, files), "--model", str(model), "--phot", str(phot),
                            "--out", str(out2), "--parse-threads", "1"] + extra, {**env, "RANK": str(k), "WORLD_SIZE": "2"}, cpus=str(k))
                 for k in range(2)]
        rr = _wait(procs)
        wall = time.perf_counter() - t
        stars = sum(f["stars"] for x in rr if x["result"] for f in x["result"]["files"])
        report["two_ranks_1_core_each"] = {"ranks": rr, "stars": stars, "wall_s": wall, "stars_per_s": stars / wall,
                                           "peak_rss_mb_per_rank": [x["peak_rss_mb"] for x in rr]}
        print("2 ranks:", stars, "stars", stars / wall, "stars/s", flush=True)

    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out_json}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
