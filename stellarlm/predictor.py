"""Predictor: a trained network with its vocabulary and calibration, asked for any tokens given any others.

The machinery of a question (the public face is :class:`stellarlm.StellarLM`, a Predictor that
also fine-tunes, indexes and scores anomalies): the star table is read into token values and
errors (:mod:`stellarlm.star_table`), normalised, packed and encoded; the decoder answers each
wanted name with a mixture of Gaussians, which goes back to physical units and gets the
calibration of the star's kind of input (:mod:`stellarlm.input_kinds`). Fine-tuning and
calibration ask their questions through this class, so they stand below the public face.

Example
-------
>>> from stellarlm.predictor import Predictor
>>> model = Predictor.load("default")      # the shipped model; or a directory of your own
>>> out = model.query({"teff": [4800.0], "logg": [2.5], "m_h": [-0.2]}, want=["g", "j", "xp_500"])
>>> out.colnames
['g', 'g_err', 'j', 'j_err', 'xp_500', 'xp_500_err']
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .data.gaia_xp import relevant_bases_counts
from .data.xp_basis import coefficients_to_tokens
from .errors import BadValueError
from .input_kinds import calibration_tables, input_kind
from .integrity import sha256_file
from .predictive import Predictive, stack
from .pretrained import resolve_model_path
from .star_table import check_values, refuse, table_columns
from .training import load_model, pick_device
from .vocab import N_XP, XP_NAMES, Vocabulary


def pack_present(ids: np.ndarray, vn: np.ndarray, en: np.ndarray, present: np.ndarray):
    """Each star's present tokens packed to the left (order is irrelevant to the model), as the
    encoder takes them: token ids, values, errors (normalised) and the mask, each (b, widest star).
    A star with nothing observed attends to one dummy token; its answers are blanked by the caller."""
    counts = present.sum(1)
    width = max(int(counts.max()), 1)
    order = np.argsort(~present, axis=1, kind="stable")[:, :width]
    mask = np.take_along_axis(present, order, 1)
    tok = ids[order]
    val = np.where(mask, np.take_along_axis(np.nan_to_num(vn), order, 1), 0.0)
    err = np.where(mask, np.take_along_axis(en, order, 1), 1.0)
    mask[counts == 0, 0] = True
    return tok, val, err, mask


class Predictor:
    """A trained stellarlm model with its vocabulary, behind a query API."""

    def __init__(self, model, vocab: Vocabulary, meta: dict, device: str = "auto"):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.meta = meta
        self.trained_tokens = set(meta.get("trained_tokens", vocab.names))
        typical = meta.get("typical_error", {})
        self._typical_error = np.array([typical.get(t.name, 0.1) for t in vocab.tokens], dtype=np.float64)
        # the calibration fitted on the validation split (stellarlm.calibration), per kind of input
        self._calibration = calibration_tables(meta, vocab)
        self.path = None  # the model directory, for a model read by load()
        self._sha256 = None

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", vocab: Vocabulary | None = None) -> Predictor:
        """Load a model: ``model.safetensors`` + ``model.json`` from directory ``path``.

        Parameters
        ----------
        path : str or os.PathLike
            A model directory (one written by ``stellarlm train``), or ``"default"`` for the model
            shipped with the package (an existing directory of that name wins, as in transformers'
            ``from_pretrained``).
        device : str
            ``"auto"`` (CUDA, else MPS, else CPU), or a torch device such as ``"cpu"``.
        vocab : Vocabulary, optional
            If given, the checkpoint must have been trained with the same token ids (else
            :class:`~stellarlm.errors.VocabularyMismatchError`).

        Returns
        -------
        Predictor
            An instance of the class it is called on (``StellarLM.load`` gives a StellarLM).

        Examples
        --------
        >>> from stellarlm import StellarLM
        >>> model = StellarLM.load("default", device="cpu")
        >>> "teff" in model.names
        True
        """
        directory = resolve_model_path(path)
        model, ckpt_vocab, meta = load_model(directory, vocab)
        out = cls(model, ckpt_vocab, meta, device)
        out.path = directory
        out._sha256 = sha256_file(directory / "model.safetensors")  # read now: what was loaded
        return out

    @property
    def model_sha256(self) -> str:
        """SHA-256 of the model's weights file ``model.safetensors`` (as in its ``checksums.json``):
        what ties a similarity index to the model that made it. A model not read from a directory:
        the SHA-256 of its weights serialised as :func:`stellarlm.training.save_model` writes them.

        >>> len(Predictor.load("default").model_sha256)
        64
        """
        if self._sha256 is None:
            import hashlib

            from safetensors.torch import save

            from .training import vocabulary_fingerprint

            state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}
            blob = save(state, metadata={"vocabulary_sha256": vocabulary_fingerprint(self.vocab)})
            self._sha256 = hashlib.sha256(blob).hexdigest()
        return self._sha256

    @property
    def names(self) -> list[str]:
        """Every token name the model's vocabulary holds (what may be given or asked).

        >>> Predictor.load("default").names[:2], len(Predictor.load("default").names)
        (['xp_338', 'xp_344'], 326)
        """
        return self.vocab.names

    # --- input handling -------------------------------------------------------------------------

    def _columns(self, observed) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict, int]:
        """Split the input into token values, token errors and pass-through columns (:func:`table_columns`)."""
        return table_columns(observed, self.vocab)

    def _check_trained(self, names) -> None:
        untrained = [n for n in names if n not in self.trained_tokens]
        if untrained:
            raise BadValueError(f"this model was not trained on {untrained[:5]}"
                                + (f" (and {len(untrained) - 5} more)" if len(untrained) > 5 else "")
                                + "; its answers for them would be meaningless")

    def _check_inputs(self, values: dict, errors: dict) -> None:
        """Refuse what cannot be an observation (:func:`check_values`)."""
        check_values(values, errors, self.vocab)

    def _encode_inputs(self, values: dict, errors: dict, rows: slice):
        """Stars ``rows`` in model units: token ids, values, errors (the typical training error where
        none is given), which are present, and which stars have nothing. One batch at a time, so
        that a query's memory does not grow with the number of stars."""
        names = list(values)
        ids = self.vocab.ids(names)
        v = np.column_stack([values[k][rows] for k in names])
        e = np.column_stack([errors[k][rows] if k in errors else np.full(len(v), np.nan) for k in names])
        with np.errstate(invalid="ignore"):
            vn, en = self.vocab.normalise(v, ids, e)
        # a value given without an error: assume the token's typical training error
        en = np.where(np.isfinite(en), en, self._typical_error[ids])
        present = np.isfinite(vn)
        return ids, vn, en, present, ~present.any(1)

    def _batches(self, values: dict, errors: dict, n: int, batch_size: int, show: bool = False):
        """:meth:`_encode_inputs` of each batch of ``batch_size`` stars: (slice, encoded)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise BadValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        for start in tqdm(range(0, n, batch_size), desc="query", unit="batch", disable=not show):
            sl = slice(start, start + batch_size)
            yield sl, self._encode_inputs(values, errors, sl)

    # --- queries --------------------------------------------------------------------------------

    def query(self, observed, want: Sequence[str], batch_size: int = 256, progress: bool | None = None):
        """Predict the ``want`` tokens (mean and 1-sigma) for every star in ``observed``.

        The mean and sigma are the moments of the model's predictive distribution, which may have
        several modes (:meth:`predictive` gives it whole) and, once calibrated on the validation
        split (:mod:`stellarlm.calibration`), heavy tails: sigma counts them, so the central 68%
        interval (``predictive(...).quantile(0.16)`` to ``quantile(0.84)``) is often narrower.

        Raises UnknownTokenError for an unknown name (with suggestions), BadValueError for an
        infinite value, a non-1-D column, empty input, a wanted name that is also given, or a
        unit that does not convert. A star with no observed token gets NaN answers.

        >>> import astropy.units as u
        >>> from astropy.table import Table
        >>> model = Predictor.load("default")
        >>> stars = Table({"g": [12.3, 14.1] * u.mag, "bp": [12.9, 14.9] * u.mag, "rp": [11.6, 13.3] * u.mag})
        >>> out = model.query(stars, want=["teff", "logg"])
        >>> out.colnames, out["teff"].unit
        (['teff', 'teff_err', 'logg', 'logg_err'], Unit("K"))
        """
        from astropy.table import Table
        import astropy.units as u

        answer, passthrough = self._answer(observed, want, batch_size, progress)
        mean, sigma = answer.moments()
        out = Table()
        for k, col in passthrough.items():
            out[k] = col
        for j, name in enumerate(answer.names):
            unit = self.vocab[name].unit
            out[name] = mean[:, j]
            out[f"{name}_err"] = sigma[:, j]
            if unit:
                out[name].unit = out[f"{name}_err"].unit = u.Unit(unit)
        return out

    def predictive(self, observed, want: Sequence[str], batch_size: int = 256,
                   progress: bool | None = None) -> Predictive:
        """The whole predictive distribution of each ``want`` token, a mixture of Gaussians in
        physical units (:class:`stellarlm.predictive.Predictive`): its median, quantiles and draws.
        Same inputs and errors as :meth:`query`, whose mean and sigma are its moments.

        >>> model = Predictor.load("default")
        >>> p = model.predictive({"teff": [5000.0], "m_h": [0.0]}, ["logg"])
        >>> p.weight.shape, bool(abs(p.weight.sum() - 1) < 1e-5)   # (stars, names, components)
        ((1, 1, 2), True)
        """
        return self._answer(observed, want, batch_size, progress)[0]

    @torch.inference_mode()
    def _answer(self, observed, want, batch_size: int, progress: bool | None) -> tuple[Predictive, dict]:
        """The calibrated predictive mixture of ``want`` for each star, and the pass-through columns."""
        if want is None or not isinstance(want, (str, Sequence, np.ndarray)):
            raise BadValueError(f"want must be a token name or a list of them, not {type(want).__name__}")
        want = [want] if isinstance(want, str) else [str(w) for w in want]
        if not want:
            raise BadValueError("want is empty: name at least one token to predict")
        want_ids = self.vocab.ids(want)
        values, errors, passthrough, n = self._columns(observed)
        self._check_trained(want + list(values))
        both = [w for w in want if w in values]
        if both:
            raise BadValueError(f"{both} are both given and wanted; drop them from one of the two")
        self._check_inputs(values, errors)
        show = progress if progress is not None else n > 50_000
        q_ids = torch.as_tensor(want_ids, device=self.device)
        parts, kinds = [], []
        for _, (ids, vn, en, present, empty) in self._batches(values, errors, n, batch_size, show):
            kinds.append(input_kind(self.vocab, ids, present))
            weight, mean, sigma = self._predict(ids, vn, en, present, q_ids)
            # each component to physical units on its own: the normalisation is not linear
            # (Vocabulary.normalise), so a wide mixture's moments are taken after it
            mean, sigma = self.vocab.denormalise(mean, want_ids[:, None], sigma)
            for a in (weight, mean, sigma):
                a[empty] = np.nan
            parts.append(Predictive(want, weight, mean, sigma))
        return self._calibrated(stack(parts), want_ids, np.concatenate(kinds)), passthrough

    def _calibrated(self, answer: Predictive, want_ids: np.ndarray, kinds: np.ndarray) -> Predictive:
        """The network's answer with the validation split's calibration applied (stellarlm.calibration):
        each star's by the kind of its input (:func:`input_kind`): widened by its scale, then given
        its tail component."""
        scale, weight, width = (np.empty((len(kinds), len(want_ids))) for _ in range(3))
        for k, table in enumerate(self._calibration):
            rows = kinds == k
            scale[rows], weight[rows], width[rows] = table[want_ids].T[:, None, :]
        answer = answer.widened(scale)
        return answer.with_tail(weight, width) if np.any(weight > 0) else answer

    def _predict(self, ids, vn, en, present, q_ids):
        """One batch -> the mixture's (b, Q, K) weights, means and sigmas in normalised units. Each
        star's present tokens are packed to the left (order is irrelevant to the model)."""
        b = len(vn)
        tok, val, err, mask = pack_present(ids, vn, en, present)
        dev = self.device
        memory, memory_mask = self.model.encode(
            torch.as_tensor(tok, device=dev), torch.as_tensor(val, dtype=torch.float32, device=dev),
            torch.as_tensor(err, dtype=torch.float32, device=dev), torch.as_tensor(mask, device=dev))
        mean, logvar, logweight = self.model.decode_mixture(memory, memory_mask, q_ids.expand(b, -1))
        numpy = [x.double().cpu().numpy() for x in (logweight.exp(), mean, torch.exp(0.5 * logvar.double()))]
        return numpy[0] / numpy[0].sum(-1, keepdims=True), numpy[1], numpy[2]

    @property
    def embedding_dim(self) -> int:
        """Length of :meth:`embed`'s vectors: ``align_dim`` with a projection head, else ``d_model``."""
        cfg = self.model.cfg
        return cfg.align_dim if cfg.align_dim > 0 else cfg.d_model

    def embed(self, observed, batch_size: int = 4096, progress: bool | None = None) -> np.ndarray:
        """A fixed-length unit vector per star, for similarity search and cross-instrument matching.

        The mean of the star's encoded tokens (the encoder's output), through the model's projection
        head if it has one (``align_dim``; trained by the alignment term, see
        :mod:`stellarlm.alignment`), scaled to length one: the dot product of two is their cosine
        similarity. Any subset of tokens may be given: a star seen through its XP spectrum, its
        LAMOST-like spectrum, its labels or its photometry (a model trained with
        ``--align-weight`` puts these near each other). A star with nothing observed gets NaN.

        Returns
        -------
        numpy.ndarray
            (n_stars, :attr:`embedding_dim`) float32.

        >>> v = Predictor.load("default").embed({"g": [12.3], "bp": [12.9], "rp": [11.6]})
        >>> v.shape, round(float((v ** 2).sum()), 4)
        ((1, 64), 1.0)
        """
        values, errors, _, n = self._columns(observed)
        self._check_trained(list(values))
        self._check_inputs(values, errors)
        show = progress if progress is not None else n > 50_000
        out = []
        with torch.inference_mode():
            for _, (ids, vn, en, p, empty) in self._batches(values, errors, n, batch_size, show):
                t = torch.as_tensor
                dev = self.device
                vec = self.model.embed_vectors(t(np.broadcast_to(ids, p.shape).copy(), device=dev),
                                               t(np.nan_to_num(vn), dtype=torch.float32, device=dev),
                                               t(np.where(p, en, 1.0), dtype=torch.float32, device=dev),
                                               t(p, device=dev)).cpu().numpy()
                vec[empty] = np.nan  # nothing observed: no vector (as query gives NaN), not zeros
                out.append(vec)
        return np.concatenate(out)

    def labels_from_xp(self, bp_coefficients, rp_coefficients, phot_g_mean_mag, want=("teff", "logg", "m_h"),
                       bp_coefficient_errors=None, rp_coefficient_errors=None,
                       bp_n_relevant_bases=None, rp_n_relevant_bases=None,
                       bp_coefficient_correlations=None, rp_coefficient_correlations=None):
        """Labels from XP coefficients as the Gaia archive gives them (e-/s units, 55 per band) and G.

        The coefficients become the XP flux tokens exactly as :func:`read_xp_continuous` makes them
        (:func:`stellarlm.data.xp_basis.coefficients_to_tokens`). Pass the archive's
        ``*_coefficient_errors`` and ``*_coefficient_correlations`` (1485 per band) for the flux
        errors; without correlations they are treated as uncorrelated (a warning: errors off by up to
        ~30%), without errors the model assumes the typical training error.
        ``bp_n_relevant_bases`` / ``rp_n_relevant_bases`` (one number per star or one for all)
        truncate each spectrum as GaiaXPy's ``truncation`` does.

        >>> import numpy as np
        >>> from stellarlm import StellarLM
        >>> model = Predictor.load("default")
        >>> bp, rp = np.zeros((1, 55)), np.zeros((1, 55)); bp[0, 0] = rp[0, 0] = 5e4
        >>> out = model.labels_from_xp(bp, rp, [15.0], bp_n_relevant_bases=[20], rp_n_relevant_bases=[24])
        >>> out.colnames
        ['teff', 'teff_err', 'logg', 'logg_err', 'm_h', 'm_h_err']
        """
        g = np.atleast_1d(np.asarray(phot_g_mean_mag, dtype=float))
        n = len(g)
        # G scales every XP token (vocab.xp_flux_scale): without a usable G there is no spectrum to
        # give, and a wrong one (a flux passed as G) would be blamed on the coefficients
        lo, hi = self.vocab.valid_range("g")
        with np.errstate(invalid="ignore"):
            refuse("phot_g_mean_mag", g, ~((g >= lo) & (g <= hi)),
                    f"is not a G magnitude ({lo:g} to {hi:g} mag); the XP tokens need each star's G")

        def stacked(what, bp, rp, width=N_XP):
            arrays = [np.atleast_2d(np.asarray(x, dtype=float)) for x in (bp, rp)]
            for band, arr in zip(("bp", "rp"), arrays):
                if arr.shape != (n, width):
                    raise BadValueError(f"{band}_{what} has shape {arr.shape}; expected ({n}, {width})")
            return np.stack(arrays, axis=1)

        coeff = stacked("coefficients", bp_coefficients, rp_coefficients)
        if (bp_coefficient_errors is None) != (rp_coefficient_errors is None):
            raise BadValueError("give the coefficient errors of both bands, or of neither")
        err = (stacked("coefficient_errors", bp_coefficient_errors, rp_coefficient_errors)
               if bp_coefficient_errors is not None else np.ones_like(coeff))
        corr = None
        if bp_coefficient_correlations is not None or rp_coefficient_correlations is not None:
            corr = stacked("coefficient_correlations", bp_coefficient_correlations, rp_coefficient_correlations,
                           N_XP * (N_XP - 1) // 2)
        elif bp_coefficient_errors is not None:
            warnings.warn("labels_from_xp: no coefficient correlations given; the XP flux errors are computed as if "
                          "the coefficients were uncorrelated (off by up to ~30%)", stacklevel=2)
        n_relevant = None
        if bp_n_relevant_bases is not None or rp_n_relevant_bases is not None:
            n_relevant = np.stack([_relevant_bases(bp_n_relevant_bases, n, "bp_n_relevant_bases"),
                                   _relevant_bases(rp_n_relevant_bases, n, "rp_n_relevant_bases")], axis=1)
        values, errors = coefficients_to_tokens(coeff, err, g, corr, n_relevant)
        obs = {"g": g, **dict(zip(XP_NAMES, values.T))}
        if bp_coefficient_errors is not None:
            obs.update({f"{name}_err": e for name, e in zip(XP_NAMES, errors.T)})
        return self.query(obs, list(want))


def _relevant_bases(n_relevant, n_stars: int, what: str) -> np.ndarray:
    """(n_stars,) counts of relevant bases (all 55 for None); a bad count raises BadValueError."""
    if n_relevant is None:
        return np.full(n_stars, N_XP)
    try:
        return relevant_bases_counts(n_relevant, n_stars)
    except ValueError as exc:
        raise BadValueError(f"{what} {exc}") from exc
