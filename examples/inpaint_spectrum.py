"""Inpainting: the BP range (336-634 nm) + G -> the RP range of a Gaia XP spectrum, and the blue half of a
LAMOST-like (SYNTHETIC) spectrum -> its red half.

    python examples/inpaint_spectrum.py [--model models/default] [--out docs/tasks/inpaint_spectrum.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.data.lamost import lamost_bin_centres
from stellarlm.tasks.generation import LAMOST_NAMES, XP_BIN_CENTRES_NM, XP_NAMES, sample_xp
from stellarlm.tasks.inpainting import inpaint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="docs/tasks/inpaint_spectrum.png")
    args = p.parse_args()
    plt.rcParams["text.usetex"] = False
    model = StellarLM.load(args.model)
    test = load_embedded().subset("test")
    i = int(np.nonzero(np.isfinite(test.column("lamost_0")) & (test.column("teff") < 4600))[0][0])
    xp = test.select(XP_NAMES).values[i:i + 1].astype(float)
    given = xp.copy()
    given[:, XP_BIN_CENTRES_NM > 640] = np.nan  # the RP range withheld
    filled, sigma = inpaint(model, XP_NAMES, given, also={"g": test.column("g")[i:i + 1]})
    wave, truth, _ = sample_xp(xp)
    _, pred, err = sample_xp(filled, sigma)
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6.5))
    a.plot(wave, truth[0], "k", lw=1, label="observed XP")
    a.plot(wave, pred[0], "C3", lw=1, label="BP observed + RP inpainted")
    a.fill_between(wave, pred[0] - err[0], pred[0] + err[0], color="C3", alpha=0.3, label="±1σ (RP predicted)")
    a.axvspan(640, 1020, color="0.9", zorder=0)
    a.set_xlabel("wavelength [nm]")
    a.set_ylabel("flux at G = 15 [1e-17 W m$^{-2}$ nm$^{-1}$]")
    a.legend(fontsize=8)
    a.set_title(f"Gaia DR3 {test.source_id[i]}: RP (shaded) predicted from BP + G", fontsize=9)
    lam = test.select(LAMOST_NAMES).values[i:i + 1].astype(float)
    half = lam.copy()
    half[:, 100:] = np.nan
    lf, ls = inpaint(model, LAMOST_NAMES, half)
    w = lamost_bin_centres()
    b.plot(w, lam[0], "k", lw=1, label="SYNTHETIC LAMOST-like spectrum")
    b.plot(w[100:], lf[0, 100:], "C3", lw=1, label="red half inpainted from the blue half")
    b.fill_between(w[100:], lf[0, 100:] - ls[0, 100:], lf[0, 100:] + ls[0, 100:], color="C3", alpha=0.3)
    b.set_xlabel("wavelength [Å]")
    b.set_ylabel("flux / median")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
