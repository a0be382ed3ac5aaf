"""Benchmark pictures: predicted vs APOGEE with residual panels, and z-score histograms."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABEL_TEXT = {"teff": r"$T_\mathrm{eff}$ [K]", "logg": r"$\log g$ [dex]", "m_h": "[M/H] [dex]",
              "alpha_m": r"[$\alpha$/M] [dex]"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["text.usetex"] = False  # gaiaxpy switches it on when imported; no TeX here
    return plt


def predicted_vs_true(path: Path, label: str, truth: np.ndarray, preds: dict[str, np.ndarray], title: str) -> Path:
    """One column per method: predicted vs true (top) and residual vs true (bottom), coloured by
    the density of stars (log counts in hexagonal bins)."""
    plt = _pyplot()
    from ..vocab import robust_scatter

    methods = list(preds)
    fig, axes = plt.subplots(2, len(methods), figsize=(3.2 * len(methods), 5.6), sharex=True,
                             gridspec_kw={"height_ratios": [2.2, 1]}, squeeze=False)
    ok_truth = np.isfinite(truth)
    lo, hi = np.nanpercentile(truth, [0.5, 99.5])
    span = hi - lo
    extent = (lo - 0.05 * span, hi + 0.05 * span)
    # one residual scale for every column, so that the panels compare at a glance
    scatters = [robust_scatter(preds[m][ok_truth] - truth[ok_truth]) for m in methods]
    lim = 5 * max(float(np.nanmedian(scatters)), 1e-9)
    for col, name in enumerate(methods):
        p = preds[name]
        ok = ok_truth & np.isfinite(p)
        top, bottom = axes[0, col], axes[1, col]
        top.hexbin(truth[ok], p[ok], gridsize=60, bins="log", mincnt=1, cmap="viridis",
                   extent=(*extent, *extent))
        top.plot(extent, extent, color="k", lw=0.8)
        top.set_xlim(extent)
        top.set_ylim(extent)
        r = p[ok] - truth[ok]
        top.set_title(f"{name}\nscatter {scatters[col]:.3g}, bias {np.median(r):+.2g}", fontsize=9)
        bottom.hexbin(truth[ok], r, gridsize=(60, 25), bins="log", mincnt=1, cmap="viridis",
                      extent=(*extent, -lim, lim))
        bottom.axhline(0, color="k", lw=0.8)
        bottom.set_ylim(-lim, lim)
        bottom.set_xlabel(f"APOGEE {LABEL_TEXT.get(label, label)}")
        if col == 0:
            top.set_ylabel(f"predicted {LABEL_TEXT.get(label, label)}")
            bottom.set_ylabel("predicted - APOGEE")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def z_histograms(path: Path, z: dict[str, dict[str, np.ndarray]], title: str) -> Path:
    """z-score histograms per label (one line per method) against the unit Gaussian."""
    plt = _pyplot()
    labels = list(next(iter(z.values())))
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.0), squeeze=False)
    grid = np.linspace(-5, 5, 201)
    edges = np.linspace(-5, 5, 51)
    for ax, label in zip(axes[0], labels):
        for method, per_label in z.items():
            ax.hist(np.clip(per_label[label], -5, 5), bins=edges, density=True, histtype="step", label=method)
        ax.plot(grid, np.exp(-0.5 * grid ** 2) / np.sqrt(2 * np.pi), color="k", lw=0.8, ls="--", label="N(0, 1)")
        ax.set_xlabel(f"z, {LABEL_TEXT.get(label, label)}")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
