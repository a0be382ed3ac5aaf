"""Real Gaia XP input: the astroquery star through every route, and the model's sigmas by G.

    python benchmarks/real_xp.py [--model models/default] [--out benchmarks/results]

Writes ``real_xp.json`` and ``real_xp.md``:
- the one real Gaia DR3 star astroquery ships (XP_CONTINUOUS full and truncated, XP_SAMPLED, each in
  all four formats; G synthesised from the spectrum): Teff, logg, [M/H] and their sigmas, and how far
  the routes' tokens are apart in units of their errors;
- on the test split (XP + G with their own errors), the 16/50/84th percentiles of the model's Teff
  and logg sigma in bins of G: what a test star of that brightness is told.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from stellarlm import StellarLM, load_embedded
from stellarlm.cli import DEFAULT_MODEL
from stellarlm.data.gaia_xp import astroquery_example_files, read_xp_continuous, read_xp_sampled
from stellarlm.vocab import XP_NAMES

WANT = ["teff", "logg", "m_h"]
G_EDGES = [0, 10, 11, 12, 13, 14, 21]
FORMATS = ("csv", "ecsv", "fits", "vot")


def star_routes(model: StellarLM) -> dict:
    files = astroquery_example_files()
    g = [float(read_xp_continuous(files["XP_CONTINUOUS"]["ecsv"], g_mag="synthetic").column("g")[0])]
    out = {"source_id": 5937083312263887616, "g_synthetic": g[0], "routes": {}}
    for fmt in FORMATS:
        tables = {"continuous": read_xp_continuous(files["XP_CONTINUOUS"][fmt], g_mag=g),
                  "continuous_truncated": read_xp_continuous(files["XP_CONTINUOUS"][fmt], g_mag=g, truncate=True),
                  "sampled": read_xp_sampled(files["XP_SAMPLED"][fmt], g_mag=g)}
        ref = tables["sampled"].select(XP_NAMES)
        for route, t in tables.items():
            ans = model.query(t.observed(t.names), WANT)
            xp = t.select(XP_NAMES)
            out["routes"][f"{route}/{fmt}"] = {
                **{w: float(ans[w][0]) for w in WANT}, **{f"{w}_err": float(ans[f"{w}_err"][0]) for w in WANT},
                "median_abs_token_diff_over_error_vs_sampled": float(np.median(np.abs(xp.values - ref.values) / ref.errors)),
            }
    return out


def sigma_by_g(model: StellarLM) -> list[dict]:
    test = load_embedded().subset("test")
    ans = model.query(test.observed(XP_NAMES + ["g"]), ["teff", "logg"])
    g = test.column("g").astype(float)
    rows = []
    for lo, hi in zip(G_EDGES[:-1], G_EDGES[1:]):
        sel = (g >= lo) & (g < hi)
        row = {"g_range": [lo, hi], "n_stars": int(sel.sum())}
        for w in ("teff", "logg"):
            row[f"{w}_err_p16_p50_p84"] = [float(x) for x in np.percentile(np.asarray(ans[f"{w}_err"])[sel], [16, 50, 84])]
        rows.append(row)
    return rows


def to_markdown(res: dict) -> str:
    s = res["star"]
    lines = [f"Gaia DR3 {s['source_id']} (astroquery's test data), G = {s['g_synthetic']:.3f} (synthetic)", "",
             "| route / format | Teff [K] | logg | [M/H] | median token diff / error vs XP_SAMPLED |", "|---|---|---|---|---|"]
    for k, r in s["routes"].items():
        lines.append(f"| {k} | {r['teff']:.0f} ± {r['teff_err']:.0f} | {r['logg']:.2f} ± {r['logg_err']:.2f} | "
                     f"{r['m_h']:+.2f} ± {r['m_h_err']:.2f} | {r['median_abs_token_diff_over_error_vs_sampled']:.2g} |")
    lines += ["", "Test split, XP + G: the model's sigma (16th / 50th / 84th percentile) by G", "",
              "| G [mag] | stars | Teff sigma [K] | logg sigma [dex] |", "|---|---|---|---|"]
    for r in res["sigma_by_g"]:
        t, lg = r["teff_err_p16_p50_p84"], r["logg_err_p16_p50_p84"]
        lines.append(f"| {r['g_range'][0]}-{r['g_range'][1]} | {r['n_stars']} | {t[0]:.0f} / {t[1]:.0f} / {t[2]:.0f} | "
                     f"{lg[0]:.3f} / {lg[1]:.3f} / {lg[2]:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    model = StellarLM.load(args.model)
    res = {"model": args.model, "star": star_routes(model), "sigma_by_g": sigma_by_g(model)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_xp.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    (out / "real_xp.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
