"""Extinction curve: generate one star's XP spectrum at increasing A_K and read A(lambda)/A(V) off
the ratio; compare with published laws (Gordon et al. 2023 and Fitzpatrick 1999, R_V = 3.1).

    python examples/extinction_curve.py [--model models/default] [--out docs/tasks/extinction_curve.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from stellarlm import StellarLM
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.tasks.extinction import extinction_curve, published_law


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="docs/tasks/extinction_curve.png")
    args = p.parse_args()
    plt.rcParams["text.usetex"] = False
    model = StellarLM.load(args.model)
    curve = extinction_curve(model, teff=4800, logg=2.5, m_h=0.0, a_k=[0.0, 0.1, 0.2, 0.3, 0.5])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a_k, row in zip(curve.a_k, curve.relative):
        ax.plot(curve.wavelength_nm, row, lw=1, label=f"stellarlm, A_K = {a_k:.1f}")
    for law, style in (("G23", "k--"), ("F99", "k:")):
        ax.plot(curve.wavelength_nm, published_law(curve.wavelength_nm, law, 3.1), style, label=f"{law}, R_V = 3.1")
    ax.set_ylim(0, 2)
    ax.set_xlabel("wavelength [nm]")
    ax.set_ylabel("A(λ) / A(550 nm)")
    ax.set_title("Extinction from generated XP spectra (Teff 4800 K, logg 2.5, [M/H] 0)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
