"""Generation: a test star's labels -> its Gaia XP spectrum and its LAMOST-like (SYNTHETIC) spectrum.

    python examples/generate_spectrum.py [--model models/default] [--out docs/tasks/generate_spectrum.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.tasks.generation import LAMOST_NAMES, XP_NAMES, generate_lamost, generate_xp, sample_xp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="docs/tasks/generate_spectrum.png")
    args = p.parse_args()
    plt.rcParams["text.usetex"] = False
    model = StellarLM.load(args.model)
    test = load_embedded().subset("test")
    labels = ["teff", "logg", "m_h", "alpha_m", "a_k"]
    ok = np.isfinite(test.select(labels + ["lamost_0", "xp_500"]).values).all(1)
    stars = [i for i in np.nonzero(ok)[0] if 4500 < test.column("teff")[i] < 5000 and test.column("logg")[i] < 3][:1]
    stars += [i for i in np.nonzero(ok)[0] if 5600 < test.column("teff")[i] < 6000 and test.column("logg")[i] > 4][:1]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    for col, i in enumerate(stars):
        lab = {n: test.column(n)[i] for n in labels}
        xp = generate_xp(model, **lab)
        wave, flux, err = xp.sampled()
        _, obs, _ = sample_xp(test.select(XP_NAMES).values[i:i + 1].astype(float))
        ax = axes[0, col]
        ax.plot(wave, obs[0], "k", lw=1, label="observed (Gaia XP)")
        ax.plot(wave, flux[0], "C1", lw=1, label="generated from the APOGEE labels")
        ax.fill_between(wave, flux[0] - err[0], flux[0] + err[0], color="C1", alpha=0.3, label="±1σ")
        ax.set_title(", ".join(f"{k}={v:.2f}" if k != "teff" else f"Teff={v:.0f}" for k, v in lab.items()), fontsize=9)
        ax.set_xlabel("wavelength [nm]")
        ax.set_ylabel("flux at G = 15 [1e-17 W m$^{-2}$ nm$^{-1}$]")
        ax.legend(fontsize=8)
        lw, lf, ls = generate_lamost(model, **lab)
        ax = axes[1, col]
        ax.plot(lw, test.select(LAMOST_NAMES).values[i].astype(float), "k", lw=1, label="SYNTHETIC LAMOST-like 'observed'")
        ax.plot(lw, lf[0], "C0", lw=1, label="generated")
        ax.fill_between(lw, lf[0] - ls[0], lf[0] + ls[0], color="C0", alpha=0.3)
        ax.set_xlabel("wavelength [Å]")
        ax.set_ylabel("flux / median")
        ax.legend(fontsize=8)
    fig.suptitle("stellarlm generation: labels -> spectra (held-out test stars)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
