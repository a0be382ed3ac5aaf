"""Translation between instruments: Gaia XP (+ G) -> LAMOST-like spectrum, and back.
The LAMOST-like modality is SYNTHETIC (stellarlm.data.synthetic_lamost).

    python examples/translate_xp_lamost.py [--model models/default] [--out docs/tasks/translate_xp_lamost.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.data.lamost import lamost_bin_centres
from stellarlm.tasks.generation import LAMOST_NAMES, XP_NAMES, sample_xp
from stellarlm.tasks.translation import lamost_to_xp, xp_to_lamost


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="docs/tasks/translate_xp_lamost.png")
    args = p.parse_args()
    plt.rcParams["text.usetex"] = False
    model = StellarLM.load(args.model)
    test = load_embedded().subset("test")
    i = int(np.nonzero(np.isfinite(test.column("lamost_0")) & (test.column("teff") > 5500))[0][0])
    xp = test.select(XP_NAMES).values[i:i + 1].astype(float)
    lam = test.select(LAMOST_NAMES).values[i:i + 1].astype(float)
    lf, ls = xp_to_lamost(model, xp, g=test.column("g")[i:i + 1])
    xf, xs = lamost_to_xp(model, lam)
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6.5))
    w = lamost_bin_centres()
    a.plot(w, lam[0], "k", lw=1, label="SYNTHETIC LAMOST-like spectrum")
    a.plot(w, lf[0], "C2", lw=1, label="translated from Gaia XP + G")
    a.fill_between(w, lf[0] - ls[0], lf[0] + ls[0], color="C2", alpha=0.3)
    a.set_xlabel("wavelength [Å]")
    a.set_ylabel("flux / median")
    a.legend(fontsize=8)
    a.set_title(f"Gaia DR3 {test.source_id[i]}", fontsize=9)
    wave, truth, _ = sample_xp(xp)
    _, pred, err = sample_xp(xf, xs)
    b.plot(wave, truth[0], "k", lw=1, label="observed Gaia XP")
    b.plot(wave, pred[0], "C2", lw=1, label="translated from the LAMOST-like spectrum")
    b.fill_between(wave, pred[0] - err[0], pred[0] + err[0], color="C2", alpha=0.3)
    b.set_xlabel("wavelength [nm]")
    b.set_ylabel("flux at G = 15 [1e-17 W m$^{-2}$ nm$^{-1}$]")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
