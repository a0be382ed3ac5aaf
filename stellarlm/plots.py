"""Figures for alignment, similarity search and anomaly scores (matplotlib, imported when drawing).

Used by ``benchmarks/alignment.py``, ``benchmarks/anomaly.py`` and the examples
``examples/retrieval_matrix.py``, ``examples/similar_stars.py``, ``examples/anomaly_roc.py``.
"""

from __future__ import annotations

import numpy as np

from .vocab import XP_BIN_CENTRES_NM


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["text.usetex"] = False  # gaiaxpy turns it on at import
    return plt


def retrieval_matrix(result: dict, ax, title: str = "") -> None:
    """Draw :func:`stellarlm.alignment.retrieval`'s result on ``ax``: rows the query view, columns
    the searched view, colour the top-10 share, text top-1 / top-10 / median rank."""
    views = result["views"]
    grid = np.full((len(views), len(views)), np.nan)
    for i, a in enumerate(views):
        for j, b in enumerate(views):
            if a != b:
                grid[i, j] = result["pairs"][f"{a}->{b}"]["top10"]
    ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for i, a in enumerate(views):
        for j, b in enumerate(views):
            if a == b:
                continue
            r = result["pairs"][f"{a}->{b}"]
            ax.text(j, i, f"top-1 {r['top1']:.2f}\ntop-10 {r['top10']:.2f}\nrank {r['median_rank']:.0f}",
                    ha="center", va="center", fontsize=7, color="w" if r["top10"] < 0.6 else "k")
    ax.set_xticks(range(len(views)), views)
    ax.set_yticks(range(len(views)), views)
    ax.set_xlabel("found among (view B)")
    ax.set_ylabel("query (view A)")
    ax.set_title(title or f"the same star among {result['n_stars']} (chance: top-10 {10 / result['n_stars']:.3f})",
                 fontsize=8)


def save_retrieval_matrices(results: dict[str, dict], path) -> None:
    """One :func:`retrieval_matrix` panel per model (``{label: result}``), written to ``path``."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.8), squeeze=False)
    for ax, (label, result) in zip(axes[0], results.items()):
        retrieval_matrix(result, ax, f"{label}\nthe same star among {result['n_stars']} (chance: top-10 "
                                     f"{10 / result['n_stars']:.3f}, rank {result['n_stars'] / 2:.0f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path, title: str = "") -> None:
    """ROC curves ``{defect: (fpr, tpr, auc)}`` on one panel, written to ``path``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (clean test stars)")
    ax.set_ylabel("true positive rate (stars with the defect)")
    ax.set_title(title or "anomaly score: injected defects", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_spectra_grid(panels: list[dict], path, ncols: int = 5, suptitle: str = "") -> None:
    """XP spectra in a grid: each panel a dict with ``flux`` (114,), optional ``model`` and
    ``model_err`` (the model's prediction), ``others`` (a list of (114,) spectra drawn thin) and
    ``title``."""
    plt = _plt()
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows), squeeze=False, sharex=True)
    for ax, p in zip(axes.ravel(), panels):
        for other in p.get("others", []):
            ax.plot(XP_BIN_CENTRES_NM, other, color="0.6", lw=0.7)
        if "model" in p:
            ax.plot(XP_BIN_CENTRES_NM, p["model"], "C1", lw=1, label="model, given the rest")
            if "model_err" in p:
                ax.fill_between(XP_BIN_CENTRES_NM, p["model"] - p["model_err"], p["model"] + p["model_err"],
                                color="C1", alpha=0.3, lw=0)
        ax.plot(XP_BIN_CENTRES_NM, p["flux"], "k", lw=1, label="observed")
        ax.set_title(p.get("title", ""), fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("wavelength [nm]", fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
