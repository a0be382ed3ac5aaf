"""Any-to-any: photometry -> Teff, labels + G -> Ks, and XP + G -> BP - RP colour, from one model.

    python examples/any_to_any.py [--model models/default] [--out docs/tasks/any_to_any.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.tasks import ask
from stellarlm.tasks.generation import XP_NAMES
from stellarlm.vocab import robust_scatter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="docs/tasks/any_to_any.png")
    args = p.parse_args()
    plt.rcParams["text.usetex"] = False
    model = StellarLM.load(args.model)
    test = load_embedded().subset("test")
    col = {n: test.column(n).astype(float) for n in test.names}
    cases = [
        ("photometry (G, BP, RP, J, H, Ks) -> Teff [K]", ["g", "bp", "rp", "j", "h", "k"], ["teff"], col["teff"]),
        ("Teff, logg, [M/H], A_K, G -> Ks [mag]", ["teff", "logg", "m_h", "a_k", "g"], ["k"], col["k"]),
        ("XP + G -> BP - RP [mag]", XP_NAMES + ["g"], ["bp", "rp"], col["bp"] - col["rp"]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (title, given, want, truth) in zip(axes, cases):
        mean, _ = ask(model, {n: col[n] for n in given}, want)
        pred = mean[:, 0] if len(want) == 1 else mean[:, 0] - mean[:, 1]
        ok = np.isfinite(pred) & np.isfinite(truth)
        ax.hexbin(truth[ok], pred[ok], gridsize=50, bins="log", mincnt=1)
        lo, hi = np.percentile(truth[ok], [0.5, 99.5])
        ax.plot([lo, hi], [lo, hi], "k", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(f"{title}\nrobust scatter {robust_scatter(pred[ok] - truth[ok]):.3g}", fontsize=9)
        ax.set_xlabel("true")
        ax.set_ylabel("stellarlm")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
