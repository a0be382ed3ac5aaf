"""Anomaly scores: how surprised the model is by a star, on one scale for every star.

**Groups.** A star's tokens fall into up to four groups (:data:`GROUPS`): its XP spectrum (114
bins), its LAMOST-like spectrum (200 bins), its labels (Teff, logg, [M/H], [α/M]) and its
photometry (BP, RP, J, H, Ks). G is never scored and always given when the star has it: it sets
the scale of the XP tokens (they are the flux at G = 15) and the distance, which no other group
tells. The extinction and parallax tokens are left out.

**Raw score.** For each group g the star has, the model reads every other group it has (and G)
and predicts g's tokens; the raw score is the mean negative log-likelihood per token of g's
observed values under those predictions (:func:`group_nll`): a Gaussian mixture per token, with
the value's own measurement variance added, in the model's normalised units (the constant
log(2 pi)/2 included).

**Calibration.** A raw NLL depends on the group and on what the model was given (XP from labels
alone is harder than XP from labels, photometry and a LAMOST-like spectrum), so each (group,
given groups) pair gets its own scale: on the validation split (stars with all four groups, the
others masked in turn: 4 x 8 pairs), the median m and the robust spread s (1.4826 MAD) of the raw
score. A star's group score is the robust z-score ``z_g = (nll_g - m) / s`` of its pair. The
star's **anomaly** is its largest group z-score, and ``anomaly_percentile`` is where that falls
among validation stars with the same groups (0-100): 99 means only 1% of ordinary stars with
these observations look as odd. A star with no group, or only G: NaN.

:func:`calibrate_anomaly` computes the calibration; ``stellarlm anomaly calibrate`` stores it in
the model's ``model.json`` (``anomaly_calibration``), which :meth:`stellarlm.StellarLM.anomaly`
uses; without one stored it calibrates on the embedded data's validation split once per session.

**Defects** (:func:`inject_defect`, for ``benchmarks/anomaly.py`` and the tests): an XP spectrum
paired with another star's labels and photometry; a 60 nm XP region scaled or replaced by noise;
an unresolved binary; a LAMOST-like spectrum from another star.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from tqdm import tqdm

from .errors import BadValueError, ConfigError
from .vocab import LAMOST_NAMES, XP_NAMES, xp_flux_scale

GROUPS: dict[str, list[str]] = {"xp": XP_NAMES, "lamost": LAMOST_NAMES, "labels": ["teff", "logg", "m_h", "alpha_m"],
                                "photometry": ["bp", "rp", "j", "h", "k"]}
ALWAYS_GIVEN = ["g"]
CALIBRATION_VERSION = 1
DEFECTS = ("swapped_labels_photometry", "region_scaled", "region_noise", "binary", "swapped_lamost")
_HALF_LOG_2PI = 0.5 * np.log(2 * np.pi)


def set_key(groups) -> str:
    """The canonical name of a set of groups: ``"xp+labels"`` (in :data:`GROUPS` order; ``""`` empty)."""
    return "+".join(g for g in GROUPS if g in set(groups))


def pair_key(group: str, given) -> str:
    """``"xp|labels+photometry"``: group ``xp`` predicted from those groups (and G)."""
    return f"{group}|{set_key(given)}"


def group_nll(model, values: dict, errors: dict, given: list[str], scored: list[str], batch_size: int = 512,
              ) -> np.ndarray:
    """(n,) mean NLL per observed token of ``scored`` given the ``given`` names (normalised units,
    see the module doc); NaN for a star with no observed scored token or no observed given one.
    ``values`` and ``errors``: physical-unit columns as :meth:`StellarLM._columns` returns them."""
    import torch

    n = len(next(iter(values.values())))
    given = [g for g in given if g in values]
    scored = [s for s in scored if s in values]
    out = np.full(n, np.nan)
    if not given or not scored:
        return out
    vocab = model.vocab
    q_ids = torch.as_tensor(vocab.ids(scored), device=model.device)
    s_ids = vocab.ids(scored)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            ids, vn, en, present, empty = model._encode_inputs({k: values[k] for k in given},
                                                               {k: errors[k] for k in given if k in errors}, rows)
            tv = np.column_stack([values[k][rows] for k in scored])
            te = np.column_stack([errors[k][rows] if k in errors else np.full(len(tv), np.nan) for k in scored])
            with np.errstate(invalid="ignore"):
                yn, yen = vocab.normalise(tv, s_ids, te)
            yen = np.where(np.isfinite(yen), yen, model._typical_error[s_ids])
            weight, mean, sigma = model._predict(ids, vn, en, present, q_ids)
            var = sigma ** 2 + yen[:, :, None] ** 2
            log_p = np.log(np.maximum(weight, 1e-300)) - 0.5 * ((yn[:, :, None] - mean) ** 2 / var + np.log(var))
            top = log_p.max(-1, keepdims=True)
            nll = -(top[..., 0] + np.log(np.exp(log_p - top).sum(-1))) + _HALF_LOG_2PI
            seen = np.isfinite(yn)
            with np.errstate(invalid="ignore"):
                mean_nll = np.where(seen, nll, 0.0).sum(1) / seen.sum(1)
            mean_nll[empty | ~seen.any(1)] = np.nan
            out[rows] = mean_nll
    return out


def observed_groups(values: dict) -> dict[str, np.ndarray]:
    """(n,) booleans per group: which stars have at least one observed token of it."""
    n = len(next(iter(values.values())))
    have = {}
    for g, names in GROUPS.items():
        cols = [values[k] for k in names if k in values]
        have[g] = np.zeros(n, bool) if not cols else np.any([np.isfinite(c) for c in cols], axis=0)
    return have


def _given_names(groups) -> list[str]:
    return ALWAYS_GIVEN + [n for g in groups for n in GROUPS[g]]


def raw_scores(model, values: dict, errors: dict, batch_size: int = 512, progress: bool = False
               ) -> dict[str, np.ndarray]:
    """(n,) raw score (:func:`group_nll`) per group, each given every other group the star has."""
    have = observed_groups(values)
    n = len(next(iter(values.values())))
    pattern = np.zeros(n, dtype=np.int64)
    for i, g in enumerate(GROUPS):
        pattern |= have[g].astype(np.int64) << i
    out = {g: np.full(n, np.nan) for g in GROUPS}
    jobs = [(p, g) for p in np.unique(pattern) for i, g in enumerate(GROUPS) if p >> i & 1]
    for p, g in tqdm(jobs, desc="anomaly", unit="pass", disable=not progress):
        rows = np.flatnonzero(pattern == p)
        others = [h for i, h in enumerate(GROUPS) if p >> i & 1 and h != g]
        sub_v = {k: v[rows] for k, v in values.items()}
        sub_e = {k: v[rows] for k, v in errors.items()}
        out[g][rows] = group_nll(model, sub_v, sub_e, _given_names(others), GROUPS[g], batch_size)
    return out


def calibrate_anomaly(model, table, max_stars: int | None = 2000, seed: int = 0, batch_size: int = 512,
                      progress: bool = False) -> dict:
    """The calibration of :meth:`StellarLM.anomaly` from ``table`` (a TokenTable, the validation
    split): per (group, given groups) the median and robust spread of the raw score, per set of
    groups the percentiles of the anomaly (largest z), from up to ``max_stars`` stars that have
    every group the table holds (the others masked in turn, see the module doc)."""
    values, errors = _table_columns(table)
    have = observed_groups(values)
    groups = [g for g in GROUPS if have[g].any()]
    if not groups:
        raise BadValueError("calibrate_anomaly: the table has no token of any scored group")
    full = np.all([have[g] for g in groups], axis=0)
    if "g" in values:
        full &= np.isfinite(values["g"])
    rows = np.flatnonzero(full)
    if max_stars is not None and len(rows) > max_stars:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_stars, replace=False))
    if len(rows) < 20:
        raise BadValueError(f"calibrate_anomaly needs at least 20 stars with every group, got {len(rows)}")
    values = {k: v[rows] for k, v in values.items()}
    errors = {k: v[rows] for k, v in errors.items()}
    pairs = [(g, others) for g in groups for r in range(len(groups))
             for others in itertools.combinations([h for h in groups if h != g], r)]
    raw = {}
    for g, others in tqdm(pairs, desc="calibrate anomaly", unit="pass", disable=not progress):
        raw[pair_key(g, others)] = group_nll(model, values, errors, _given_names(others), GROUPS[g], batch_size)
    stats = {}
    for key, x in raw.items():
        x = x[np.isfinite(x)]
        med = float(np.median(x))
        scale = float(1.4826 * np.median(np.abs(x - med))) or float(np.std(x)) or 1.0
        stats[key] = {"median": med, "scale": scale}
    sets = {}
    for r in range(1, len(groups) + 1):
        for subset in itertools.combinations(groups, r):
            z = np.max([(raw[pair_key(g, [h for h in subset if h != g])] - stats[pair_key(g, [h for h in subset
                         if h != g])]["median"]) / stats[pair_key(g, [h for h in subset if h != g])]["scale"]
                        for g in subset], axis=0)
            z = z[np.isfinite(z)]
            sets[set_key(subset)] = {"percentiles": np.percentile(z, np.arange(101)).round(5).tolist()}
    return {"version": CALIBRATION_VERSION, "n_stars": int(len(rows)), "groups": groups, "pairs": stats, "sets": sets,
            "data": str(table.meta.get("name", "")), "split": _split_name(table)}


def _split_name(table) -> str:
    from .data.table import SPLITS

    splits = np.unique(table.split)
    return ",".join(SPLITS[int(s)] for s in splits)


def _table_columns(table) -> tuple[dict, dict]:
    values = {n: table.column(n).astype(np.float64) for n in table.names}
    errors = {n: table.error(n).astype(np.float64) for n in table.names}
    return values, errors


def score(model, values: dict, errors: dict, calibration: dict, batch_size: int = 512, progress: bool = False
          ) -> dict[str, np.ndarray]:
    """Raw scores, z-scores, the anomaly and its percentile (see the module doc) as (n,) arrays:
    ``nll_<group>``, ``z_<group>``, ``anomaly``, ``anomaly_percentile``, ``groups`` (the set key)."""
    if calibration.get("version") != CALIBRATION_VERSION:
        raise ConfigError("the anomaly calibration is from another version of stellarlm; redo it with "
                          "'stellarlm anomaly calibrate --model ...'")
    raw = raw_scores(model, values, errors, batch_size, progress)
    have = observed_groups(values)
    n = len(next(iter(values.values())))
    out: dict[str, np.ndarray] = {}
    zs = {}
    for g in GROUPS:
        out[f"nll_{g}"] = raw[g]
        zs[g] = np.full(n, np.nan)
    keys = np.array([set_key([g for g in GROUPS if have[g][i]]) for i in range(n)], dtype=object)
    anomaly = np.full(n, np.nan)
    percentile = np.full(n, np.nan)
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        groups = key.split("+") if key else []
        for g in groups:
            stats = calibration["pairs"].get(pair_key(g, [h for h in groups if h != g]))
            if stats is None:
                continue  # a group the calibration data did not have: no scale for it
            zs[g][rows] = (raw[g][rows] - stats["median"]) / stats["scale"]
        z = np.array([zs[g][rows] for g in groups]) if groups else np.full((1, len(rows)), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: no score
            anomaly[rows] = np.nanmax(z, axis=0)
        known = calibration["sets"].get(key)
        if known is not None:
            pct = np.interp(anomaly[rows], known["percentiles"], np.arange(101.0))
            percentile[rows] = np.where(np.isfinite(anomaly[rows]), pct, np.nan)
    for g in GROUPS:
        out[f"z_{g}"] = zs[g]
    out["anomaly"] = anomaly
    out["anomaly_percentile"] = percentile
    out["groups"] = keys.astype(str)
    return out


# --- defects --------------------------------------------------------------------------------------
def _others(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random partner for each of n stars, never itself."""
    shift = rng.integers(1, n, size=n)
    return (np.arange(n) + shift) % n


def _combine_mags(m1, m2):
    return -2.5 * np.log10(10 ** (-0.4 * m1) + 10 ** (-0.4 * m2))


def inject_defect(table, kind: str, seed: int = 0, region_bins: int = 10, scale_range=(0.15, 0.3),
                  noise: float = 0.2, companion_dmag=(0.0, 1.0)):
    """A copy of ``table`` (a TokenTable) with defect ``kind`` (:data:`DEFECTS`) put into every star:

    * ``swapped_labels_photometry``: the labels and photometry (G included) of another star;
    * ``region_scaled``: ``region_bins`` neighbouring XP bins (10: 60 nm, at a random place)
      multiplied by 1 -/+ a factor drawn from ``scale_range`` (0.7-0.85 or 1.15-1.3);
    * ``region_noise``: those bins replaced by Gaussian noise about their mean, of ``noise`` times it;
    * ``binary``: another star put behind it, ``companion_dmag`` (0-1) mag fainter in G: XP fluxes
      add in linear flux (each token / :func:`~stellarlm.vocab.xp_flux_scale` of its star's G, the
      sum times that of the combined G), each magnitude combines as
      -2.5 log10(10^-0.4 m1 + 10^-0.4 m2), LAMOST-like spectra (each divided by its median) add
      weighted by the stars' G fluxes and are divided by the median again (an approximation:
      their absolute flux is not known); labels, extinction and parallax stay the primary's;
    * ``swapped_lamost``: the LAMOST-like spectrum of another star.
    """
    if kind not in DEFECTS:
        raise BadValueError(f"unknown defect {kind!r}; expected one of {DEFECTS}")
    rng = np.random.default_rng(seed)
    out = table.subset(np.arange(len(table)))  # a copy
    v, e = out.values.astype(np.float64), out.errors.astype(np.float64)
    n = len(out)
    col = {name: j for j, name in enumerate(out.names)}
    partner = _others(n, rng)

    def cols(names):
        return [col[x] for x in names if x in col]

    if kind in ("swapped_labels_photometry", "swapped_lamost"):
        names = (GROUPS["labels"] + ["g"] + GROUPS["photometry"]) if kind == "swapped_labels_photometry" \
            else GROUPS["lamost"]
        c = cols(names)
        v[:, c], e[:, c] = v[partner][:, c], e[partner][:, c]
    elif kind in ("region_scaled", "region_noise"):
        xp = np.array(cols(XP_NAMES))
        start = rng.integers(0, len(xp) - region_bins + 1, size=n)
        for i in range(n):
            c = xp[start[i]:start[i] + region_bins]
            if kind == "region_scaled":
                f = rng.uniform(*scale_range) * rng.choice([-1.0, 1.0])
                v[i, c] *= 1.0 + f
                e[i, c] *= abs(1.0 + f)
            else:
                level = np.nanmean(v[i, c])
                v[i, c] = level + noise * abs(level) * rng.standard_normal(len(c))
    else:  # binary
        if "g" not in col:
            raise BadValueError("the binary defect needs the G magnitude (it sets the XP flux scale)")
        g1 = v[:, col["g"]]
        g2 = v[partner, col["g"]]
        shift = g1 + rng.uniform(*companion_dmag, size=n) - g2  # companion's magnitudes move by this
        mags = cols(["g"] + GROUPS["photometry"])
        g_comb = _combine_mags(g1, g2 + shift)
        xp = cols(XP_NAMES)
        if xp:
            f1 = v[:, xp] / xp_flux_scale(g1)[:, None]
            f2 = v[partner][:, xp] / xp_flux_scale(g2 + shift)[:, None]
            s = xp_flux_scale(g_comb)[:, None]
            ef = np.hypot(e[:, xp] / xp_flux_scale(g1)[:, None], e[partner][:, xp] / xp_flux_scale(g2 + shift)[:, None])
            v[:, xp], e[:, xp] = (f1 + f2) * s, ef * s
        lam = cols(LAMOST_NAMES)
        if lam:
            w1, w2 = 10 ** (-0.4 * g1)[:, None], 10 ** (-0.4 * (g2 + shift))[:, None]
            total = w1 * v[:, lam] + w2 * v[partner][:, lam]
            err = np.hypot(w1 * e[:, lam], w2 * e[partner][:, lam])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(total, axis=1, keepdims=True)
            v[:, lam], e[:, lam] = total / med, err / med
        for c in mags:
            m1, m2 = v[:, c], v[partner, c] + shift
            f1, f2 = 10 ** (-0.4 * m1), 10 ** (-0.4 * m2)
            v[:, c] = _combine_mags(m1, m2)
            e[:, c] = np.hypot(f1 * e[:, c], f2 * e[partner, c]) / (f1 + f2)
    present = np.isfinite(v)
    out.values = v.astype(np.float32)
    out.errors = np.where(present, e, np.nan).astype(np.float32)
    return out


def roc_auc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of scores separating ``positive`` from ``negative`` (Mann-Whitney,
    ties counted half; NaN scores left out).

    >>> roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
    1.0
    """
    neg, pos = np.asarray(negative, float), np.asarray(positive, float)
    neg, pos = neg[np.isfinite(neg)], pos[np.isfinite(pos)]
    if not len(neg) or not len(pos):
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def roc_curve(negative: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over every threshold, NaN scores left out."""
    neg, pos = np.asarray(negative, float), np.asarray(positive, float)
    neg, pos = neg[np.isfinite(neg)], pos[np.isfinite(pos)]
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    neg, pos = np.sort(neg), np.sort(pos)
    fpr = 1.0 - np.searchsorted(neg, thresholds, side="left") / len(neg)
    tpr = 1.0 - np.searchsorted(pos, thresholds, side="left") / len(pos)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]
