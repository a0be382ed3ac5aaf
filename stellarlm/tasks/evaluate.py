"""Each task measured against the truth and against the simple baseline it must beat.

Every function takes a trained model and two :class:`~stellarlm.data.table.TokenTable` parts of the
same data: ``train`` (where baselines are fitted) and ``test`` (held-out stars, where everything is
measured). Each returns a dict ``{"model": {...}, "baseline": {...}, ...}`` of plain numbers.

Every comparison also carries ``"training_median"``: predicting the training split's median for
every star, i.e. knowing nothing about the star; a task that does not beat it has learned nothing.

Spectra are compared by the median relative flux error (median over stars and pixels of
|pred - true| / |true|) and by chi^2/dof against the observed spectrum's own errors (mean over
stars of the mean over pixels of (pred - true)^2 / sigma_true^2). XP spectra are compared on their
114 flux bins (336-1020 nm, scaled to G = 15), the LAMOST-like (SYNTHETIC) ones on their 200 bins.
"""

from __future__ import annotations

import numpy as np

from ..bench import PHOTOMETRY
from ..bench.baselines import knn_predict, linear_predict
from ..data.lamost import lamost_bin_centres
from ..data.table import TokenTable
from ..query import StellarLM
from ..vocab import robust_scatter
from . import ask
from .extinction import extinction_curve, published_law
from .generation import LAMOST_NAMES, XP_BIN_CENTRES_NM, XP_NAMES
from .inpainting import inpaint
from .loci import kiel_locus, running_median, teff_locus

GENERATION_LABELS = ["teff", "logg", "m_h", "alpha_m", "a_k"]
RP_ONLY_NM = 640.0  # above this the sampled XP spectrum is RP alone
INPAINT_REGION_NM = (500.0, 600.0)  # the XP region hidden in the "inpaint a wavelength range" task


def spectrum_errors(pred: np.ndarray, true: np.ndarray, true_err: np.ndarray) -> dict:
    """Median relative flux error and chi^2/dof of ``pred`` against ``true`` (n, pixels)."""
    ok = np.isfinite(pred) & np.isfinite(true) & np.isfinite(true_err) & (true_err > 0) & (true != 0)
    rel = np.abs(pred - true) / np.abs(true)
    chi2 = np.where(ok, (pred - true) ** 2 / np.where(ok, true_err, 1.0) ** 2, 0.0)
    per_star = chi2.sum(1) / np.maximum(ok.sum(1), 1)
    return {"median_relative_error": float(np.median(rel[ok])), "chi2_dof": float(np.mean(per_star[ok.any(1)])),
            "n_stars": int(ok.any(1).sum())}


def _values(table: TokenTable, names: list[str]) -> np.ndarray:
    return table.select(names).values.astype(np.float64)


def _linear(train: TokenTable, test: TokenTable, src: list[str], dst: list[str]) -> np.ndarray:
    """The linear-regression baseline: ``dst`` from ``src``, fitted on ``train``, predicted for ``test``."""
    return linear_predict(_values(train, src), _values(train, dst), _values(test, src))


def _complete(table: TokenTable, names: list[str]) -> TokenTable:
    """The stars that have every one of ``names``."""
    return table.subset(np.nonzero(np.isfinite(table.select(names).values).all(1))[0])


def _compare(pred_tokens: dict[str, np.ndarray], truth: TokenTable, names: list[str], kind: str, pixels=None) -> dict:
    """Spectrum errors of each prediction (n, len(names)) against ``truth``'s tokens ``names``;
    ``pixels(wavelength)`` picks the bins that are measured."""
    true_v = _values(truth, names)
    true_e = truth.select(names).errors.astype(np.float64)
    wave = XP_BIN_CENTRES_NM if kind == "xp" else lamost_bin_centres()
    sel = slice(None) if pixels is None else pixels(wave)
    return {k: spectrum_errors(v[:, sel], true_v[:, sel], true_e[:, sel]) for k, v in pred_tokens.items()}


def _median_of(train: TokenTable, names: list[str], n: int) -> np.ndarray:
    """The training split's median of each of ``names``, for ``n`` stars."""
    return np.broadcast_to(np.nanmedian(_values(train, names), axis=0), (n, len(names)))


def evaluate_generation(model: StellarLM, train: TokenTable, test: TokenTable) -> dict:
    """Labels (Teff, logg, [M/H], [alpha/M], A_K) -> XP spectrum and LAMOST-like spectrum, against the
    spectrum of the nearest training star in (standardised) label space."""
    out = {}
    for kind, names in (("xp", XP_NAMES), ("lamost", LAMOST_NAMES)):
        tr, te = _complete(train, GENERATION_LABELS + names), _complete(test, GENERATION_LABELS + names)
        labels = {n: te.column(n) for n in GENERATION_LABELS}
        mean, _ = ask(model, labels, names)
        nearest = knn_predict(_values(tr, GENERATION_LABELS), _values(tr, names), _values(te, GENERATION_LABELS), k=1)
        out[kind] = _compare({"model": mean, "baseline": nearest, "training_median": _median_of(tr, names, len(te))},
                             te, names, kind)
    out["baseline"] = "spectrum of the nearest training star in standardised (Teff, logg, [M/H], [alpha/M], A_K)"
    return out


def _inpaint_case(model, train, test, given: list[str], hidden: list[str], also: list[str], kind: str, pixels=None):
    names = given + hidden
    tr, te = _complete(train, names + also), _complete(test, names + also)
    values = _values(te, names)
    values[:, len(given):] = np.nan
    filled, _ = inpaint(model, names, values, also={n: te.column(n) for n in also})
    base, median = values.copy(), values.copy()
    base[:, len(given):] = _linear(tr, te, given + also, hidden)
    median[:, len(given):] = _median_of(tr, hidden, len(te))
    spectrum = XP_NAMES if kind == "xp" else LAMOST_NAMES
    order = [names.index(n) for n in spectrum]
    return _compare({"model": filled[:, order], "baseline": base[:, order], "training_median": median[:, order]}, te,
                    spectrum, kind, pixels)


def evaluate_inpainting(model: StellarLM, train: TokenTable, test: TokenTable) -> dict:
    """BP (+ G) -> RP; the XP spectrum without 500-600 nm (+ G) -> 500-600 nm; the blue half of the
    LAMOST-like spectrum -> the red half. Baseline: linear regression from the given part, fitted on
    the training set. Measured on the hidden part (the RP wavelengths, 500-600 nm, the red
    LAMOST-like bins)."""
    blue = [n for n, w in zip(XP_NAMES, XP_BIN_CENTRES_NM) if w < RP_ONLY_NM]
    red = [n for n in XP_NAMES if n not in blue]
    lo, hi = INPAINT_REGION_NM
    region = [n for n, w in zip(XP_NAMES, XP_BIN_CENTRES_NM) if lo <= w < hi]
    half = len(LAMOST_NAMES) // 2
    return {
        "bp_to_rp": _inpaint_case(model, train, test, blue, red, ["g"], "xp", lambda w: w >= RP_ONLY_NM),
        "xp_region": _inpaint_case(model, train, test, [n for n in XP_NAMES if n not in region], region, ["g"], "xp",
                                   lambda w: (w >= lo) & (w < hi)),
        "lamost_blue_to_red": _inpaint_case(model, train, test, LAMOST_NAMES[:half], LAMOST_NAMES[half:], [],
                                            "lamost", lambda w: np.arange(len(w)) >= half),
        "baseline": "linear regression (ridge) from the given part, fitted on the training set",
    }


def _model_and_baselines(model: StellarLM, train: TokenTable, test: TokenTable, src: list[str], dst: list[str]):
    """The stars that have all of ``src`` and ``dst``, and their ``dst`` predicted from ``src`` by the
    model, the linear baseline and the training median."""
    tr, te = _complete(train, src + dst), _complete(test, src + dst)
    mean, _ = ask(model, {n: te.column(n) for n in src}, dst)
    return tr, te, {"model": mean, "baseline": _linear(tr, te, src, dst), "training_median": _median_of(tr, dst, len(te))}


def evaluate_translation(model: StellarLM, train: TokenTable, test: TokenTable) -> dict:
    """XP + G -> LAMOST-like, and LAMOST-like -> XP; baseline: linear regression fitted on the training set."""
    out = {}
    for key, src, dst, kind in (("xp_to_lamost", XP_NAMES + ["g"], LAMOST_NAMES, "lamost"),
                                ("lamost_to_xp", LAMOST_NAMES, XP_NAMES, "xp")):
        tr, te, preds = _model_and_baselines(model, train, test, src, dst)
        out[key] = _compare(preds, te, dst, kind)
    out["baseline"] = "linear regression (ridge) fitted on the training set"
    return out


def evaluate_extinction(model: StellarLM, teff: float = 4800.0, logg: float = 2.5, m_h: float = 0.0,
                        a_k: tuple = (0.0, 0.1, 0.2, 0.3, 0.5), law: str = "G23", r_v: float = 3.1,
                        band_nm: tuple = (420.0, 950.0)) -> dict:
    """A(lambda)/A(550 nm) of a red-clump-like giant from generated spectra, against a published law;
    baseline: grey extinction (the same at every wavelength)."""
    curve = extinction_curve(model, teff, logg, m_h, a_k)
    ref = published_law(curve.wavelength_nm, law, r_v)
    sel = (curve.wavelength_nm >= band_nm[0]) & (curve.wavelength_nm <= band_nm[1])
    diffs = [float(np.nanmedian(np.abs(row[sel] - ref[sel]))) for row in curve.relative]
    at = {f"{w:.0f}nm": [float(np.interp(w, curve.wavelength_nm, row)) for row in curve.relative] for w in (440, 800, 950)}
    return {"star": {"teff": teff, "logg": logg, "m_h": m_h}, "a_k": curve.a_k.tolist(), "law": f"{law} R_V={r_v}",
            "model": {"median_abs_diff": diffs, "relative_at": at},
            "law_at": {k: float(np.interp(float(k[:-2]), curve.wavelength_nm, ref)) for k in at},
            "baseline": {"median_abs_diff": float(np.median(np.abs(1.0 - ref[sel]))), "what": "grey: A(lambda)/A(V) = 1"},
            "band_nm": list(band_nm)}


def evaluate_loci(model: StellarLM, data: TokenTable, metallicities=(-1.0, -0.5, 0.0, 0.3), width: float = 0.15,
                  teff_edges=np.arange(3700.0, 6701.0, 200.0), logg_edges=np.arange(0.5, 5.01, 0.25)) -> dict:
    """The model's logg(Teff) and Teff(logg) loci at several [M/H], against the running median of the
    stars of ``data`` within +-``width`` dex; baseline: those stars' overall median (no locus)."""
    out = {"metallicities": list(metallicities), "logg_given_teff": [], "teff_given_logg": []}
    teff, logg, m_h = (data.column(n).astype(np.float64) for n in ("teff", "logg", "m_h"))
    for value in metallicities:
        sel = np.abs(m_h - value) < width
        for key, x, y, edges, locus in (("logg_given_teff", teff, logg, teff_edges, kiel_locus),
                                        ("teff_given_logg", logg, teff, logg_edges, teff_locus)):
            med = running_median(x[sel], y[sel], edges)
            centres = 0.5 * (edges[:-1] + edges[1:])
            pred, _ = locus(model, centres, value)
            ok = np.isfinite(med)
            out[key].append({"m_h": value, "n_stars": int(sel.sum()), "bins": int(ok.sum()),
                             "model": float(np.median(np.abs(pred[ok] - med[ok]))) if ok.any() else float("nan"),
                             "baseline": float(np.median(np.abs(np.nanmedian(y[sel]) - med[ok]))) if ok.any() else float("nan")})
    return out


def evaluate_any_to_any(model: StellarLM, train: TokenTable, test: TokenTable) -> dict:
    """Photometry -> labels; labels + G -> the other magnitudes; XP + G -> BP - RP colour. Robust scatter
    against the truth; baseline: linear regression fitted on the training set."""
    out = {}
    cases = (("photometry_to_labels", PHOTOMETRY, ["teff", "logg", "m_h"]),
             ("labels_to_photometry", ["teff", "logg", "m_h", "a_k", "g"], ["bp", "rp", "j", "h", "k"]),
             ("xp_to_colour", XP_NAMES + ["g"], ["bp", "rp"]))
    for key, src, dst in cases:
        tr, te, preds = _model_and_baselines(model, train, test, src, dst)
        truth = _values(te, dst)
        if key == "xp_to_colour":  # the colour, not the two magnitudes
            preds = {k: v[:, :1] - v[:, 1:] for k, v in preds.items()}
            truth, dst = truth[:, :1] - truth[:, 1:], ["bp_rp"]
        out[key] = {"inputs": src if len(src) < 10 else "XP + G", "n_stars": len(te),
                    **{k: {n: robust_scatter(v[:, j] - truth[:, j]) for j, n in enumerate(dst)}
                       for k, v in preds.items()}}
    out["baseline"] = "linear regression (ridge) fitted on the training set"
    return out
