"""GPU throughput of stellarlm (issue 18, section 3): inference stars/s and training samples/s.

    python benchmarks/gpu_speed.py [--device cuda] [--compile] [--quick] [--out benchmarks/results/gpu_speed.json]

For the default model configuration and a ~10x larger one (d_model 336, 8 heads: ~10x the
parameters), it measures

* ``model_only``: XP + G -> teff, logg, m_h on tokens already on the device, bf16 autocast, for
  several batch sizes (the fixed-input encoder of :mod:`stellarlm.survey`);
* ``from_host``: the same through :meth:`stellarlm.survey.Labeller.columns` from numpy arrays in host
  memory (pinned, non-blocking copies; denormalisation and moments on the CPU): what
  ``stellarlm label --device cuda`` does per chunk;
* ``training``: AdamW steps with bf16 autocast on synthetic batches shaped like the training
  batches (115 input tokens, 16 targets a star), samples/s;
* ``end_to_end``: ``label_files`` on a generated bulk file (``--e2e-rows``, gzipped) with
  ``--parse-threads`` reader threads: parsing on the CPU, the model on the GPU;
* ``ranks_end_to_end`` (``--ranks N``): N processes (RANK/WORLD_SIZE set as torchrun sets them),
  each labelling its own ``--rank-rows`` bulk file with the trained ``models/default`` on the
  same GPU, one thread each: the aggregate stars/s, process start-up included.

The weights are untrained (speed does not depend on them). Writes JSON. ``--device cpu --quick``
checks the script on a machine without a GPU (the numbers are then CPU numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stellarlm.model import ModelConfig, StellarTransformer, gaussian_nll  # noqa: E402
from stellarlm.training import TrainConfig, save_model  # noqa: E402
from stellarlm.vocab import XP_NAMES, Vocabulary  # noqa: E402

CONFIGS = {"default": {}, "large_10x": {"d_model": 336, "n_heads": 8}}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, seconds: float, min_iter: int = 3) -> tuple[float, int]:
    fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < min_iter or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    _sync(device)
    return time.perf_counter() - t0, n


def make_model(directory: Path, overrides: dict) -> Path:
    vocab = Vocabulary.default()
    t = TrainConfig()
    cfg = ModelConfig(n_vocab=len(vocab), patch_of=vocab.patches(t.patch_size, t.lamost_patch_size), **overrides)
    torch.manual_seed(0)
    save_model(directory, StellarTransformer(cfg), vocab, {"note": f"untrained {overrides or 'default'}"})
    return directory


def inference(model_dir: Path, device: str, batches: list[int], compile: bool, seconds: float) -> dict:
    from stellarlm.survey import Labeller

    lab = Labeller(model_dir, ["teff", "logg", "m_h"], device=device, compile=compile)
    dev = lab.device
    out = {"parameters": lab.lm.model.n_parameters(), "model_only": {}, "from_host": {}}
    rng = np.random.default_rng(0)
    for b in batches:
        vals = np.column_stack([rng.uniform(0.5, 5, (b, len(XP_NAMES))), rng.uniform(10, 17, b)])
        errs = np.abs(vals) * 0.02
        vn, en = lab.lm.vocab.normalise(vals, lab.in_ids, errs)
        v = torch.as_tensor(vn, dtype=torch.float32, device=dev)
        e = torch.as_tensor(en, dtype=torch.float32, device=dev)
        q = lab.q_ids.expand(b, -1)

        @torch.inference_mode()
        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=lab.amp):
                mem, mask = lab.fixed.encode(v, e)
                return lab.net.decode_mixture(mem, mask, q)

        try:
            dt, n = _timed(step, dev, seconds)
            out["model_only"][b] = b * n / dt
            lab.batch_size = b
            dt, n = _timed(lambda: lab.columns(vals, errs), dev, seconds)
            out["from_host"][b] = b * n / dt
        except torch.OutOfMemoryError:
            out["model_only"][b] = "out of memory"
            break
        print(f"  batch {b}: model only {out['model_only'][b]:.0f}, from host {out['from_host'][b]:.0f} stars/s",
              flush=True)
    return out


def training(overrides: dict, device: str, batch: int, seconds: float, compile: bool) -> dict:
    dev = torch.device(device)
    vocab = Vocabulary.default()
    t = TrainConfig()
    cfg = ModelConfig(n_vocab=len(vocab), patch_of=vocab.patches(t.patch_size, t.lamost_patch_size), **overrides)
    model = StellarTransformer(cfg).to(dev)
    net = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    n_in, n_q = 115, 16
    ids = torch.stack([torch.randperm(len(vocab), generator=g)[:n_in + n_q] for _ in range(batch)]).to(dev)
    vals = torch.randn(batch, n_in, generator=g).to(dev)
    errs = torch.rand(batch, n_in, generator=g).add(0.01).to(dev)
    mask = torch.rand(batch, n_in, generator=g).gt(0.2).to(dev)
    mask[:, 0] = True
    target = torch.randn(batch, n_q, generator=g).to(dev)
    terr = torch.rand(batch, n_q, generator=g).mul(0.1).to(dev)
    tmask = torch.ones(batch, n_q, dtype=torch.bool, device=dev)
    use_amp = dev.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            mean, logvar, logweight = net(ids[:, :n_in], vals, errs, mask, ids[:, n_in:])
        loss = gaussian_nll(mean.float(), logvar.float(), target, terr, tmask, 0.0, logweight.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    dt, n = _timed(step, dev, seconds)
    return {"batch": batch, "samples_per_s": batch * n / dt, "parameters": model.n_parameters(), "bf16": use_amp}


def _write_photometry(path: Path, source_ids) -> Path:
    """A join file giving every star G = 14 (speed does not depend on the value)."""
    with open(path, "w") as f:
        f.write("source_id,phot_g_mean_mag\n" + "".join(f"{i},14.0\n" for i in source_ids))
    return path


def end_to_end(model_dir: Path, device: str, rows: int, parse_threads: int, batch: int | None) -> dict:
    from stellarlm.data.gaia_bulk import write_bulk_file
    from stellarlm.survey import label_files

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src = write_bulk_file(d / "XpContinuousMeanSpectrum_gpu.csv.gz", rows, first_source_id=10**15)
        phot = _write_photometry(d / "phot.csv", range(10**15, 10**15 + rows))
        t = time.perf_counter()
        res = label_files([src], model_dir, d / "out", photometry=[phot], device=device, progress=False,
                          parse_threads=parse_threads, batch_size=batch, threads=1)
        wall = time.perf_counter() - t
        r = res[0]
        return {"rows": rows, "status": r.status, "reason": r.reason, "wall_s": wall, "stars_per_s": r.stars / wall,
                "reader_busy_s": r.parse_seconds, "model_busy_s": r.model_seconds, "parse_threads": parse_threads}


_RANK_WORKER = """
import sys, time, glob, json
t = time.time()
from stellarlm.survey import label_files
res = label_files(sorted(glob.glob(sys.argv[1] + '/*.csv.gz')), sys.argv[2], sys.argv[1] + '/out',
                  photometry=[sys.argv[1] + '/phot.csv'], device=sys.argv[3], progress=False, threads=1)
print(json.dumps([{"stars": r.stars, "status": r.status, "parse_s": r.parse_seconds, "model_s": r.model_seconds,
                   "wall_s": time.time() - t} for r in res]))
"""


def _write_rank_file(args: tuple) -> None:
    from stellarlm.data.gaia_bulk import write_bulk_file

    directory, i, rows = args
    write_bulk_file(Path(directory) / f"XpContinuousMeanSpectrum_{i:02d}.csv.gz", rows, first_source_id=10**15 + i * 10**7)


def ranks_end_to_end(device: str, ranks: int, rows: int) -> dict:
    """``ranks`` labelling processes sharing this machine's GPU, one bulk file of ``rows`` each."""
    import subprocess
    from concurrent.futures import ProcessPoolExecutor

    with tempfile.TemporaryDirectory() as d:
        with ProcessPoolExecutor(min(ranks, os.cpu_count() or 1)) as pool:
            list(pool.map(_write_rank_file, [(d, i, rows) for i in range(ranks)]))
        _write_photometry(Path(d) / "phot.csv", (10**15 + i * 10**7 + j for i in range(ranks) for j in range(rows)))
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _RANK_WORKER, d, str(ROOT / "models" / "default"), device],
                                  stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, RANK=str(i), WORLD_SIZE=str(ranks), OMP_NUM_THREADS="1",
                                           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
                 for i in range(ranks)]
        per_rank = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        wall = time.perf_counter() - t
    stars = sum(f["stars"] for r in per_rank for f in r)
    # the fields benchmarks/survey_estimate.py reads
    return {"ranks": ranks, "rows_per_rank": rows, "stars": stars, "wall_s": wall, "stars_per_s": stars / wall,
            "parse_s_per_rank": [sum(f["parse_s"] for f in r) for r in per_rank],
            "model_s_per_rank": [sum(f["model_s"] for f in r) for r in per_rank],
            "rank_wall_s": [max((f["wall_s"] for f in r), default=0.0) for r in per_rank]}


def _write(report: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--quick", action="store_true", help="small batches, short timings (a smoke test)")
    ap.add_argument("--seconds", type=float, default=5.0, help="timing per measurement")
    ap.add_argument("--e2e-rows", type=int, default=200_000)
    ap.add_argument("--parse-threads", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--ranks", type=int, default=0, help="also label with this many processes sharing the GPU")
    ap.add_argument("--rank-rows", type=int, default=30_000, help="rows of each rank's file (--ranks)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_speed.json"))
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --quick to check the script")
    batches = [256, 1024] if args.quick else [4096, 16384, 65536, 131072]
    seconds = 0.5 if args.quick else args.seconds
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in CONFIGS.items():
            print(name, flush=True)
            model_dir = make_model(Path(tmp) / name, over)
            r = {"config": over}
            for comp in ([False, True] if args.compile else [False]):
                key = "compiled" if comp else "eager"
                r[f"inference_{key}"] = inference(model_dir, args.device, batches, comp, seconds)
            r["training"] = [training(over, args.device, b, seconds, False)
                             for b in ([64] if args.quick else [512, 2048])]
            print("  training:", [f"{x['samples_per_s']:.0f}" for x in r["training"]], "samples/s", flush=True)
            report["results"][name] = r
            _write(report, args.out)
        # last, so that a failure here (e.g. astroquery, whose test data it needs, not installed)
        # loses nothing else
        try:
            e2e = end_to_end(Path(tmp) / "default", args.device, 2000 if args.quick else args.e2e_rows,
                             args.parse_threads, None)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            e2e = {"error": f"{type(exc).__name__}: {exc}"}
        report["results"]["default"]["end_to_end"] = e2e
        print("  end to end:", e2e, flush=True)
        if args.ranks:
            r = ranks_end_to_end(args.device, args.ranks, 200 if args.quick else args.rank_rows)
            report["results"]["default"]["ranks_end_to_end"] = [r]  # a list: runs of several sizes
            print(f"  {args.ranks} ranks: {r['stars_per_s']:.0f} stars/s", flush=True)
    _write(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
