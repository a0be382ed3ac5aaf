"""Stellar loci: logg given Teff and [M/H] from the model's predictive distribution, drawn over the
Kiel diagram of the held-out test stars.

    python examples/kiel_diagram.py [--model models/default] [--out docs/tasks/kiel_diagram.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.tasks.loci import running_median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="docs/tasks/kiel_diagram.png")
    args = p.parse_args()
    plt.rcParams["text.usetex"] = False
    model = StellarLM.load(args.model)
    test = load_embedded().subset("test")
    teff, logg, m_h = (test.column(n).astype(float) for n in ("teff", "logg", "m_h"))
    metallicities = (-1.0, -0.5, 0.0, 0.3)
    fig, axes = plt.subplots(1, len(metallicities), figsize=(14, 4.2), sharey=True)
    grid = np.linspace(3700, 6700, 31)
    edges = np.arange(3700.0, 6701.0, 200.0)
    for ax, value in zip(axes, metallicities):
        sel = np.abs(m_h - value) < 0.15
        ax.scatter(teff[sel], logg[sel], s=2, c="0.6", label=f"test stars, |[M/H] - {value:+.1f}| < 0.15")
        # the whole answer once: its median is kiel_locus's locus, its draws sample_logg's; it may
        # have two modes (giants and dwarfs), so the band is 16-84%, not mean +- sigma
        answer = model.predictive({"teff": grid, "m_h": np.full(len(grid), value)}, ["logg"])
        draws = answer.sample(20, seed=1)[:, 0]
        ax.scatter(np.repeat(grid, 20), draws.ravel(), s=1, c="C1", alpha=0.4, label="samples from the model")
        ax.plot(grid, answer.median()[:, 0], "C3", label="model median, 16-84%")
        ax.fill_between(grid, answer.quantile(0.16)[:, 0], answer.quantile(0.84)[:, 0], color="C3", alpha=0.2)
        ax.plot(0.5 * (edges[:-1] + edges[1:]), running_median(teff[sel], logg[sel], edges), "k.-", label="data running median")
        ax.set_xlim(6800, 3600)
        ax.set_ylim(5.2, 0)
        ax.set_xlabel("Teff [K]")
        ax.set_title(f"[M/H] = {value:+.1f}", fontsize=9)
    axes[0].set_ylabel("logg [dex]")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
