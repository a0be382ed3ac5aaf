"""One model, many tasks: each task of stellarlm.tasks on the held-out test split, against its baseline.

    python benchmarks/tasks.py [--model models/default] [--out benchmarks/results/tasks.json] [--max-test N]

Baselines are fitted on the full training split. Prints a markdown table and writes it (.md) and JSON. The
LAMOST-like spectra are SYNTHETIC (stellarlm.data.synthetic_lamost).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from stellarlm import StellarLM, load_embedded
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.tasks.evaluate import (evaluate_any_to_any, evaluate_extinction, evaluate_generation,
                                      evaluate_inpainting, evaluate_loci, evaluate_translation)


def spectra_rows(name: str, res: dict) -> list[str]:
    m, b, z = res["model"], res["baseline"], res["training_median"]
    return [f"| {name} | {m['median_relative_error']:.4f} | {b['median_relative_error']:.4f} | "
            f"{z['median_relative_error']:.4f} | {m['chi2_dof']:.1f} | {b['chi2_dof']:.1f} | {m['n_stars']} |"]


def to_markdown(r: dict) -> str:
    lines = ["| task | model: median rel. flux error | baseline | training median | model: chi²/dof | "
             "baseline: chi²/dof | stars |", "|---|---|---|---|---|---|---|"]
    lines += spectra_rows("generation: labels -> XP", r["generation"]["xp"])
    lines += spectra_rows("generation: labels -> LAMOST-like (synthetic)", r["generation"]["lamost"])
    for key, text in (("bp_to_rp", "inpainting: BP + G -> RP (640-1020 nm)"),
                      ("xp_region", "inpainting: XP without 500-600 nm + G -> 500-600 nm"),
                      ("lamost_blue_to_red", "inpainting: blue half -> red half, LAMOST-like (synthetic)")):
        lines += spectra_rows(text, r["inpainting"][key])
    lines += spectra_rows("translation: XP + G -> LAMOST-like (synthetic)", r["translation"]["xp_to_lamost"])
    lines += spectra_rows("translation: LAMOST-like (synthetic) -> XP", r["translation"]["lamost_to_xp"])
    lines += ["", "| any-to-any | token | model robust scatter | linear baseline | training median | stars |",
              "|---|---|---|---|---|---|"]
    for key, res in r["any_to_any"].items():
        if not isinstance(res, dict):
            continue
        for token, v in res["model"].items():
            lines.append(f"| {key} | {token} | {v:.3f} | {res['baseline'][token]:.3f} | "
                         f"{res['training_median'][token]:.3f} | {res['n_stars']} |")
    e = r["extinction"]
    lines += ["", f"Extinction curve (Teff {e['star']['teff']:.0f} K, logg {e['star']['logg']}, [M/H] {e['star']['m_h']}) "
              f"vs {e['law']}, median |A(λ)/A(550 nm) - law| over {e['band_nm'][0]:.0f}-{e['band_nm'][1]:.0f} nm: "
              + ", ".join(f"A_K={a:.1f}: {d:.3f}" for a, d in zip(e["a_k"], e["model"]["median_abs_diff"]))
              + f"; grey baseline: {e['baseline']['median_abs_diff']:.3f}."]
    lines += ["", "| locus | [M/H] | model: median abs. offset from data running median | baseline (overall median) | bins |",
              "|---|---|---|---|---|"]
    for key, unit in (("logg_given_teff", "dex"), ("teff_given_logg", "K")):
        for row in r["loci"][key]:
            lines.append(f"| {key} | {row['m_h']:+.1f} | {row['model']:.3g} {unit} | {row['baseline']:.3g} {unit} | {row['bins']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="benchmarks/results/tasks.json")
    p.add_argument("--max-test", type=int, default=None, help="first N test stars only (quick look)")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="split to measure: test for reported figures, val to compare models")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    table = load_embedded()
    train, test = table.subset("train"), table.subset(args.split)
    if args.max_test:
        test = test.subset(slice(0, args.max_test))
    model = StellarLM.load(args.model)
    result = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "split": args.split, "n_train": len(train),
              "n_test": len(test),
              "generation": evaluate_generation(model, train, test),
              "inpainting": evaluate_inpainting(model, train, test),
              "translation": evaluate_translation(model, train, test),
              "any_to_any": evaluate_any_to_any(model, train, test),
              "extinction": evaluate_extinction(model),
              "loci": evaluate_loci(model, test)}
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))
    out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
