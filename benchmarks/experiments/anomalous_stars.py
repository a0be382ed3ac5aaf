"""What are the most anomalous test stars? A table of the stars benchmarks/anomaly.py lists.

    python benchmarks/experiments/anomalous_stars.py [--anomaly benchmarks/results/anomaly.json]
        [--model models/default] [--out benchmarks/results/anomalous_stars.md]

For each star of ``most_anomalous``: the group that flags it (its largest z-score), G, BP - RP,
J - Ks, APOGEE's Teff / logg / [M/H] / [α/M], and the model's from the XP
spectrum and G alone, so that a label the spectrum disagrees with, a hot or very red star, or
photometry that does not fit the spectrum can be told apart by eye.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from stellarlm import StellarLM
from stellarlm.anomaly import GROUPS
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.data.embedded import load_embedded
from stellarlm.vocab import XP_NAMES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anomaly", default="benchmarks/results/anomaly.json")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="benchmarks/results/anomalous_stars.md")
    args = p.parse_args()
    top = json.loads(Path(args.anomaly).read_text())["most_anomalous"]
    test = load_embedded().subset("test")
    where = {int(s): i for i, s in enumerate(test.source_id)}
    stars = test.subset(np.array([where[t["source_id"]] for t in top]))
    model = StellarLM.load(args.model)
    given = {n: stars.column(n) for n in XP_NAMES + ["g"]}
    pred = model.query(given, want=["teff", "logg", "m_h", "alpha_m"])
    col = {n: stars.column(n) for n in ("g", "bp", "rp", "j", "k", "teff", "logg", "m_h", "alpha_m")}
    lines = ["| source_id | anomaly | flagged by | G | BP-RP | J-Ks | APOGEE Teff / logg / [M/H] / [α/M] "
             "| model from XP + G |", "|---|---|---|---|---|---|---|---|"]
    for i, t in enumerate(top):
        flag = max(GROUPS, key=lambda g: np.nan_to_num(t[f"z_{g}"], nan=-np.inf))
        lines.append(
            f"| {t['source_id']} | {t['anomaly']:.1f} | {flag} | {col['g'][i]:.2f} | {col['bp'][i] - col['rp'][i]:.2f} "
            f"| {col['j'][i] - col['k'][i]:.2f} "
            f"| {col['teff'][i]:.0f} / {col['logg'][i]:.2f} / {col['m_h'][i]:+.2f} / {col['alpha_m'][i]:+.2f} "
            f"| {pred['teff'][i]:.0f} ± {pred['teff_err'][i]:.0f} / {pred['logg'][i]:.2f} / {pred['m_h'][i]:+.2f} "
            f"/ {pred['alpha_m'][i]:+.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
