"""Post-hoc calibration of the predicted uncertainties on the validation split.

Training minimises the NLL on training stars, which the network fits better than unseen ones, so a
long run's sigmas come out too small, and its errors have heavier tails than its answers: on the
validation split most stars' errors are a little *inside* their sigmas, while a few percent of stars
the network is sure of are far off (z = (pred - true) / sqrt(sigma_pred^2 + sigma_true^2) beyond 5).
One factor on every sigma cannot fix both: wide enough for the tails, the 68% intervals cover 80%.

:func:`fit_tail_calibration` (the default) fits three numbers per wanted token by maximum
likelihood of the validation labels: a factor on the answer's width (``sigma_scale``), and the
weight and width of a broad Gaussian component at the answer's mean (``sigma_tail``: "with
probability 0.05 the answer is 3.2 times wider"). :func:`calibrate` stores them in the model's JSON
file and :meth:`stellarlm.StellarLM.query` applies them (:meth:`Predictive.widened`,
:meth:`Predictive.with_tail`): an answer's ``_err`` is then its whole mixture's standard deviation,
tails included, and its central 68% interval (``predictive(...).quantile``) comes from the core.
:func:`fit_sigma_scale` is the older single factor (``stellarlm calibrate --no-tail``).

Stars more than ``clip`` sigmas off before calibration are left out of the fits: a handful of labels
that disagree wildly with the spectrum (e.g. an APOGEE Teff of 16,600 K for a star with BP - RP = 3)
would otherwise set the width for every star. Fit on the validation split only, never the test.

Example::

    stellarlm calibrate --model runs/default      # XP + G -> labels on the validation split
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import BadValueError
from .predictive import Predictive

CLIP = 5.0  # fit_sigma_scale: one factor, fitted on the core
TAIL_CLIP = 20.0  # fit_tail_calibration: the tail component models what lies between
TAIL_MIN_ROWS = 200  # calibrate_rows: fewer rows fit the width factor alone (three numbers would be noise)


def fit_sigma_scale(pred: np.ndarray, sigma: np.ndarray, truth: np.ndarray, truth_err: np.ndarray,
                    clip: float = CLIP) -> float:
    """The factor s with mean(r^2 / ((s sigma)^2 + e^2)) = 1 over stars with |z| <= ``clip`` at s = 1.

    >>> r = np.random.default_rng(0).normal(0, 2.0, 10_000)
    >>> round(fit_sigma_scale(r, np.ones_like(r), np.zeros_like(r), np.zeros_like(r), clip=np.inf), 2)
    2.0

    The clip is applied at s = 1, so it also trims the true tails when s is far from 1 (here
    |r| > 5 is 2.5 sigma of the true spread, and the fit says 1.9); for factors near 1, as fitted
    for the shipped model, it cuts beyond ~4 sigma and the bias is negligible.
    """
    e2 = np.nan_to_num(np.asarray(truth_err, np.float64)) ** 2
    r2 = (np.asarray(pred, np.float64) - truth) ** 2
    s2 = np.asarray(sigma, np.float64) ** 2
    ok = np.isfinite(r2) & np.isfinite(s2) & (s2 > 0)
    ok &= r2 <= clip ** 2 * (s2 + e2)
    if ok.sum() < 10:
        raise BadValueError(f"fit_sigma_scale needs at least 10 stars with finite answers, got {ok.sum()}")
    r2, s2, e2 = r2[ok], s2[ok], e2[ok]

    def excess(log_s):  # decreasing in s
        return np.mean(r2 / (np.exp(2 * log_s) * s2 + e2)) - 1.0

    lo, hi = np.log(0.05), np.log(20.0)
    if excess(lo) < 0 or excess(hi) > 0:  # the measurement errors alone explain the scatter, or nothing can
        return float(np.exp(lo if excess(lo) < 0 else hi))
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return float(np.exp(0.5 * (lo + hi)))


def fit_tail_calibration(answer: Predictive, truth: np.ndarray, truth_err: np.ndarray,
                         clip: float = TAIL_CLIP) -> tuple[float, float, float]:
    """(scale, tail weight, tail width) maximising the likelihood of ``truth`` (n_stars,) under
    ``answer`` (one name) widened by ``scale`` and given a tail component (:meth:`Predictive.with_tail`),
    each convolved with the label's own error ``truth_err``. Stars more than ``clip`` standard
    deviations off at scale 1 are left out.

    >>> rng = np.random.default_rng(0)
    >>> n = 40_000
    >>> truth = np.where(rng.random(n) < 0.1, rng.normal(0, 6.0, n), rng.normal(0, 1.2, n))
    >>> one = np.ones((n, 1, 1))
    >>> scale, weight, width = fit_tail_calibration(Predictive(["x"], one, 0 * one, one), truth, np.zeros(n))
    >>> round(scale, 1), round(weight, 2), round(width, 1)   # the core 1.2 wide, 10% five times wider
    (1.2, 0.1, 5.0)
    """
    w, mu, sd = (torch.as_tensor(np.asarray(a, np.float64)[:, 0]) for a in (answer.weight, answer.mean, answer.sigma))
    centre, std = (torch.as_tensor(a[:, 0]) for a in answer.moments())
    y = torch.as_tensor(np.asarray(truth, np.float64))
    e2 = torch.as_tensor(np.nan_to_num(np.asarray(truth_err, np.float64))) ** 2
    ok = torch.isfinite(y) & torch.isfinite(centre) & (std > 0) & ((y - centre) ** 2 <= clip ** 2 * (std ** 2 + e2))
    if ok.sum() < 10:
        raise BadValueError(f"fit_tail_calibration needs at least 10 stars with finite answers, got {int(ok.sum())}")
    w, mu, sd, centre, std, y, e2 = (a[ok] for a in (w, mu, sd, centre, std, y, e2))
    log_w = torch.log(w.clamp_min(1e-300))

    def unpack(t):  # log s, logit eps, log(k - 1)
        return t[0].exp(), torch.sigmoid(t[1]), 1 + t[2].exp()

    def nll(theta):
        s, eps, k = unpack(theta)
        m = centre[:, None] + s * (mu - centre[:, None])  # Predictive.widened
        v = (s * sd) ** 2 + e2[:, None]
        core = torch.logsumexp(log_w - 0.5 * (y[:, None] - m) ** 2 / v - 0.5 * torch.log(v), -1)
        vt = (k * s * std) ** 2 + e2
        tail = -0.5 * (y - centre) ** 2 / vt - 0.5 * torch.log(vt)
        return -torch.logaddexp(torch.log1p(-eps) + core, torch.log(eps) + tail).mean()

    best = None
    for width in (2.0, 4.0, 8.0, 16.0):  # the likelihood has a local optimum per tail width
        theta = torch.tensor([0.0, -3.0, np.log(width - 1)], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

        def closure():
            opt.zero_grad()
            loss = nll(theta)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            loss = float(nll(theta))
        if np.isfinite(loss) and (best is None or loss < best[0]):
            best = (loss, theta.detach().clone())
    s, eps, k = (float(x) for x in unpack(best[1]))
    return s, eps, k


def fit_answers(answer: Predictive, truth: np.ndarray, truth_err: np.ndarray, tail: bool = True,
                clip: float | None = None) -> dict:
    """``{"sigma_scale": {name: s}, "sigma_tail": {name: [weight, width]}}`` for each name of
    ``answer`` against ``truth`` and ``truth_err`` (n_stars, n_names): :func:`fit_tail_calibration`,
    or with ``tail=False`` :func:`fit_sigma_scale` (no ``sigma_tail``)."""
    clip = (TAIL_CLIP if tail else CLIP) if clip is None else clip
    cal = {"sigma_scale": {}, "sigma_tail": {}}
    for j, name in enumerate(answer.names):
        y, e = truth[:, j], truth_err[:, j]
        if tail:
            scale, weight, width = fit_tail_calibration(answer[name], y, e, clip)
            cal["sigma_tail"][name] = [round(weight, 5), round(width, 4)]
        else:
            mean, sigma = answer[name].moments()
            scale = fit_sigma_scale(mean[:, 0], sigma[:, 0], y, e, clip)
        cal["sigma_scale"][name] = round(scale, 4)
    return {k: v for k, v in cal.items() if v}


def calibrate_rows(model, rows, names: Sequence[str], tail_min_rows: int = TAIL_MIN_ROWS) -> tuple[dict, dict]:
    """The calibration of ``names`` (e.g. fine-tuned tokens) fitted on ``rows`` (a TokenTable: the
    user's validation part), each row given its other tokens, per kind of input
    (``stellarlm.input_kinds.INPUT_KINDS``) with at least 10 rows: scale and tail with ``tail_min_rows``
    rows or more, the scale alone below (three numbers from a few dozen stars would be noise).
    ``model``: a StellarLM (or Predictor) whose own calibration of ``names`` is not applied. Returns the fits
    ``{kind: {"sigma_scale": ..., "sigma_tail": ...}}`` (for :func:`add_calibration`) and the
    number of rows of each."""
    from .input_kinds import INPUT_KINDS, input_kind

    known = [n for n in rows.names if n not in names]
    present = np.isfinite(rows.select(known).values)
    kinds = input_kind(model.vocab, model.vocab.ids(known), present)
    truth = rows.select(list(names))
    fits, counts = {}, {}
    for k, kind in enumerate(INPUT_KINDS):
        use = np.flatnonzero(kinds == k)
        if len(use) < 10 or kind == "other":
            continue
        part = rows.subset(use)
        answer = model.predictive(part.observed(known), list(names), batch_size=1024)
        fits[kind] = fit_answers(answer, truth.values[use].astype(np.float64), truth.errors[use].astype(np.float64),
                                 tail=len(use) >= tail_min_rows)
        counts[kind] = int(len(use))
    return fits, counts


def add_calibration(meta: dict, fits: dict) -> dict:
    """``meta`` (a model's JSON) with the per-kind ``fits`` of :func:`calibrate_rows` added name by
    name; the other names keep theirs. A model calibrated before ``sigma_by_inputs`` existed (one
    calibration for every kind) gets it spelled out per kind first, so that its meaning is kept."""
    from .input_kinds import INPUT_KINDS

    meta = json.loads(json.dumps(meta))
    if "sigma_by_inputs" not in meta:
        one = {k: meta[k] for k in ("sigma_scale", "sigma_tail") if k in meta}
        meta["sigma_by_inputs"] = {kind: json.loads(json.dumps(one)) for kind in INPUT_KINDS if kind != "xp"}
    for kind, fit in fits.items():
        target = meta if kind == "xp" else meta["sigma_by_inputs"].setdefault(kind, {})
        for key, values in fit.items():
            target.setdefault(key, {}).update(values)
    return meta


def calibrate(model_dir: str | os.PathLike, inputs: Sequence[str] | None, want: Sequence[str], cache_dir=None,
              clip: float | None = None, tail: bool = True, by_inputs: bool = True) -> dict[str, float]:
    """Fit the calibration of each of ``want`` on the validation split of the embedded data
    (:func:`fit_tail_calibration`, or with ``tail=False`` :func:`fit_sigma_scale`), write it into
    ``model_dir``'s JSON file, and return the scale factors of stars with XP.

    Each kind of input (``stellarlm.input_kinds.INPUT_KINDS``) has its own: stars with XP from ``inputs``
    (default XP + G; ``sigma_scale``, ``sigma_tail``), and with ``by_inputs`` (``sigma_by_inputs``),
    stars with a LAMOST-like spectrum and no XP from the spectrum alone, and stars with photometry
    and neither spectrum from the photometry (G, BP, RP, J, H, Ks) alone: a network is
    over-confident from one kind of input and under-confident from another. A kind whose inputs the
    model was not trained on, and answers given only labels, parallax or extinction (e.g. the
    stellar loci), stay uncalibrated. Without ``by_inputs`` the XP kind's calibration serves every
    star. Refitting starts from the network's own answers."""
    from .data.embedded import load_embedded
    from .integrity import atomic_write, write_checksums
    from .input_kinds import INPUT_KINDS, KIND_GROUPS
    from .predictor import Predictor
    from .training import META_FILE, WEIGHTS_FILE, load_model
    from .vocab import XP_NAMES

    net, vocab, meta = load_model(model_dir)
    bare = {k: v for k, v in meta.items() if k not in ("sigma_scale", "sigma_tail", "sigma_by_inputs")}
    model = Predictor(net, vocab, bare)  # fit on the uncalibrated answers
    val = load_embedded(cache_dir).subset("val")
    truth = val.select(list(want))
    clip = (TAIL_CLIP if tail else CLIP) if clip is None else clip
    kinds = {"xp": list(inputs or XP_NAMES + ["g"])}
    if by_inputs:  # the other kinds from all their tokens the data has (stellarlm.input_kinds.input_kind)
        for kind in ("lamost", "photometry"):
            kinds[kind] = [n for n in val.names if vocab[n].group in KIND_GROUPS[kind]]
    fits, fitted_on = {}, {}
    for kind, names in kinds.items():
        names = [n for n in names if n in val.names]
        if not names or not set(names) <= model.trained_tokens or not set(want) <= model.trained_tokens:
            continue
        observed = val.observed(names)
        has = np.isfinite(np.column_stack([observed[n] for n in names])).any(1)
        answer = model.predictive({k: v[has] for k, v in observed.items()}, list(want), batch_size=1024)
        fits[kind] = fit_answers(answer, truth.values[has], truth.errors[has], tail, clip)
        fitted_on[kind] = {"inputs": names if len(names) < 20 else f"{len(names)} tokens", "n_stars": int(has.sum())}
    if "xp" not in fits:
        raise BadValueError(f"calibrate: the model was not trained on the inputs {kinds['xp'][:5]}... or on {list(want)}")
    meta = {**bare, **fits.pop("xp")}
    if by_inputs:  # an empty entry: that kind stays uncalibrated
        meta["sigma_by_inputs"] = {kind: fits.get(kind, {}) for kind in INPUT_KINDS if kind != "xp"}
    meta["sigma_scale_fit"] = {"split": "val", "clip": clip, "kinds": fitted_on, "kind_order": list(INPUT_KINDS),
                               "method": "scale and tail (fit_tail_calibration)" if tail else "scale (fit_sigma_scale)"}
    atomic_write(Path(model_dir) / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))
    # model.json changed on purpose: its checksum with it (load_model verifies them)
    write_checksums(model_dir, [WEIGHTS_FILE, META_FILE])
    return meta["sigma_scale"]
