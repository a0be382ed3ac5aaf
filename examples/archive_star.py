"""A real Gaia DR3 archive star, read the three ways a user may have it, and its labels.

    python examples/archive_star.py [--model models/default] [--out docs/archive_star.png]

The star (source_id 5937083312263887616) is the one astroquery ships in its test data, with its
XP_CONTINUOUS (coefficients, errors, correlations), XP_SAMPLED (Gaia's sampled spectrum) and
MCMC_MSC products. Its files carry no G: G is synthesised from the spectrum (gaiaxpy, 13.871).
Prints the model's Teff, logg and [M/H] for each route and writes the spectra as tokens.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from stellarlm import StellarLM
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.data.gaia_xp import astroquery_example_files, read_xp_continuous, read_xp_sampled
from stellarlm.vocab import XP_BIN_CENTRES_NM, XP_NAMES

WANT = ["teff", "logg", "m_h"]


def routes(files: dict) -> dict:
    """The star's token tables: archive coefficients (full and truncated) and Gaia's sampled spectrum."""
    cont = read_xp_continuous(files["XP_CONTINUOUS"]["ecsv"], g_mag="synthetic")
    g = [float(cont.column("g")[0])]
    return {"XP_CONTINUOUS": cont,
            "XP_CONTINUOUS, truncate=True": read_xp_continuous(files["XP_CONTINUOUS"]["ecsv"], g_mag=g, truncate=True),
            "XP_SAMPLED": read_xp_sampled(files["XP_SAMPLED"]["ecsv"], g_mag=g)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="docs/archive_star.png")
    args = p.parse_args()
    plt.rcParams["text.usetex"] = False
    model = StellarLM.load(args.model)
    tables = routes(astroquery_example_files())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lines = []
    for (route, t), style in zip(tables.items(), ("-", "--", ":")):
        out = model.query(t.observed(t.names), WANT)
        answer = ", ".join(f"{w} {out[w][0]:.4g} ± {out[w + '_err'][0]:.2g}" for w in WANT)
        lines.append(f"{route}: {answer}")
        xp = t.select(XP_NAMES)
        ax.plot(XP_BIN_CENTRES_NM, xp.values[0], style, lw=1.2, label=route)
        if route == "XP_SAMPLED":
            ax.fill_between(XP_BIN_CENTRES_NM, xp.values[0] - xp.errors[0], xp.values[0] + xp.errors[0],
                            color="0.8", zorder=0, label="±1σ")
    print(f"Gaia DR3 {tables['XP_SAMPLED'].source_id[0]}, G = {tables['XP_CONTINUOUS'].column('g')[0]:.3f} "
          "(synthetic)\n" + "\n".join(lines))
    ax.set(xlabel="wavelength [nm]", ylabel="XP token: flux at G = 15 [1e-17 W m$^{-2}$ nm$^{-1}$]")
    ax.set_title(f"Gaia DR3 {tables['XP_SAMPLED'].source_id[0]} (astroquery's test data)\n" + "\n".join(lines),
                 fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
