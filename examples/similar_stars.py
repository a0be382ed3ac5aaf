"""Similarity search: a test star and its nearest training stars, found by its XP spectrum and by its
(SYNTHETIC) LAMOST-like spectrum alone.

    python examples/similar_stars.py [--model models/default] [--star 0] [--out docs/alignment/similar_stars.png]

The library is the training split seen through XP spectra (StellarLM.build_index, the API of
`stellarlm index build`); StellarLM.similar searches it. The neighbours' XP spectra are drawn
over the star's, with their APOGEE labels.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.alignment import VIEWS
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.vocab import XP_BIN_CENTRES_NM, XP_NAMES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--star", type=int, default=0, help="which test star with a LAMOST-like spectrum")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--out", default="docs/alignment/similar_stars.png")
    args = p.parse_args()
    plt.rcParams["text.usetex"] = False
    model = StellarLM.load(args.model)
    data = load_embedded()
    train = data.subset("train")
    test = data.subset("test")
    test = test.subset(np.isfinite(test.select(VIEWS["lamost"]).values).any(1))
    star = test.subset([args.star])
    index = model.build_index(train, view="xp", progress=True)  # exact search: 31,858 stars
    row_of = {s: i for i, s in enumerate(train.source_id)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, view in zip(axes, ("xp", "lamost")):
        found = model.similar(star.observed(VIEWS[view]), k=args.k, index=index)
        for r in found:
            flux = train.select(XP_NAMES).values[row_of[r["source_id"]]]
            ax.plot(XP_BIN_CENTRES_NM, flux, lw=0.8, label=f"#{r['rank']} cos {r['similarity']:.3f}: "
                    f"{r['teff']:.0f} K, logg {r['logg']:.2f}, [M/H] {r['m_h']:+.2f}")
        ax.plot(XP_BIN_CENTRES_NM, star.select(XP_NAMES).values[0], "k", lw=2,
                label=f"the star: {star.column('teff')[0]:.0f} K, logg {star.column('logg')[0]:.2f}, "
                      f"[M/H] {star.column('m_h')[0]:+.2f}")
        ax.set_title(f"found by its {'XP spectrum' if view == 'xp' else 'LAMOST-like spectrum alone'}", fontsize=9)
        ax.set_xlabel("wavelength [nm]")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("XP flux at G = 15 [1e-17 W m^-2 nm^-1]")
    fig.suptitle(f"Gaia DR3 {star.source_id[0]} (test split) and its {args.k} nearest training stars "
                 f"({len(index):,}, seen through their XP spectra)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
