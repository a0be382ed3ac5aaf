"""StellarLM: ask a trained model for any tokens given any others.

Example
-------
>>> from stellarlm import StellarLM
>>> model = StellarLM.load("default")      # the shipped model; or a directory of your own
>>> out = model.query({"teff": [4800.0], "logg": [2.5], "m_h": [-0.2]}, want=["g", "j", "xp_500"])
>>> out.colnames
['g', 'g_err', 'j', 'j_err', 'xp_500', 'xp_500_err']

Inputs are in physical units: an astropy Table (columns with units are converted to the token's
unit; an incompatible unit is an error), a pandas DataFrame, or a dict of arrays. A column named
``<token>_err`` gives that token's uncertainty; without it the model assumes the typical training
error of that token. NaN means "not observed". Output is an astropy Table with a ``name`` and a
``name_err`` column per wanted name, in physical units, one row per input star.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .data.gaia_xp import relevant_bases_counts
from .errors import BadValueError, UnknownTokenError
from .integrity import sha256_file
from .predictive import Predictive, stack
from .pretrained import resolve_model_path
from .data.xp_basis import coefficients_to_tokens
from .training import load_model, pick_device
from .vocab import N_XP, XP_NAMES, Vocabulary

PASSTHROUGH = ("source_id", "star_id", "apogee_id", "designation", "split")


def _token_of(column: str) -> str:
    """The token a column belongs to: ``teff`` for both ``teff`` and ``teff_err``."""
    return column[:-4] if column.endswith("_err") else column


def _unmasked(values) -> np.ndarray:
    """A plain array; masked entries (empty cells of a CSV or FITS table) become NaN, i.e. missing,
    rather than whatever fill value sits under the mask."""
    data, mask = _split_mask(values)
    data = np.atleast_1d(np.asarray(data))
    if mask is not None and data.dtype.kind in "fiu":
        data = data.astype(np.float64)
        data[np.broadcast_to(mask, data.shape)] = np.nan
    return data


def _split_mask(col):
    """``col`` without its mask, and the mask (None if it has none): a numpy masked array or
    astropy ``MaskedColumn`` (the data keeps its unit: the fill value sits under the mask), or an
    astropy ``Masked`` Quantity. Every path from a table to tokens goes through here, so that a
    masked cell stays missing whatever unit or fill value it has."""
    from astropy.utils.masked import Masked

    if isinstance(col, Masked):
        return col.unmasked, np.asarray(col.mask, dtype=bool)
    if np.ma.isMaskedArray(col):
        mask = np.ma.getmaskarray(col)
        if hasattr(col, "quantity"):  # MaskedColumn: keep it a Column, for its unit
            from astropy.table import Column

            return Column(col.data.data, unit=col.unit, copy=False), mask
        return np.ma.getdata(col), mask
    return col, None


# what an answer is calibrated as (stellarlm.calibration): the first kind whose token groups a star
# has among its inputs; "other" (labels, parallax, extinction only) has none
INPUT_KINDS = ("xp", "lamost", "photometry", "other")
KIND_GROUPS = {"xp": ("xp_bp", "xp_rp"), "lamost": ("lamost",), "photometry": ("photometry",)}


def input_kind(vocab: Vocabulary, ids: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Each star's kind of input, an index into ``INPUT_KINDS``: 0 with any XP coefficient, else 1
    with any LAMOST-like flux, else 2 with any photometry, else 3 (labels, parallax, extinction
    only). ``present``: (n, len(ids))."""
    group = np.array([vocab.tokens[i].group for i in ids])
    kind = np.full(len(present), INPUT_KINDS.index("other"))
    for k in reversed(range(len(KIND_GROUPS))):  # the first kind that applies is written last
        kind[(present & np.isin(group, KIND_GROUPS[INPUT_KINDS[k]])).any(1)] = k
    return kind


def calibration_tables(meta: dict, vocab: Vocabulary) -> list[np.ndarray]:
    """Per kind of input (``INPUT_KINDS``), a (n_vocab, 3) array of scale, tail weight and tail width:
    the XP kind's from a model's ``sigma_scale`` and ``sigma_tail``, the others' from
    ``sigma_by_inputs`` (an empty entry: none). A model without ``sigma_by_inputs`` (calibrated
    before it existed) applies its one calibration to every kind. None: scale 1, no tail."""
    def table(cal: dict) -> np.ndarray:
        scale, tail = cal.get("sigma_scale", {}), cal.get("sigma_tail", {})
        return np.array([[scale.get(t.name, 1.0), *tail.get(t.name, (0.0, 1.0))] for t in vocab.tokens],
                        dtype=np.float64).reshape(-1, 3)

    own = meta.get("sigma_by_inputs", {})
    return [table(own.get(kind, meta)) for kind in INPUT_KINDS]


class StellarLM:
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
        self._anomaly_calibration = None  # made on first use of anomaly() when model.json has none

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", vocab: Vocabulary | None = None) -> StellarLM:
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
        StellarLM

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

        >>> len(StellarLM.pretrained().model_sha256)
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

    @classmethod
    def pretrained(cls, name_or_path: str | os.PathLike = "default", device: str = "auto",
                   vocab: Vocabulary | None = None) -> StellarLM:
        """The shipped model by name, from any working directory (as transformers' ``from_pretrained``).

        The weights come with the package (package data ``stellarlm.models_default``; the
        repository's ``models/default`` in a source checkout), so nothing is downloaded.

        Parameters
        ----------
        name_or_path : str or os.PathLike
            ``"default"`` (the only shipped model so far; see
            :data:`stellarlm.pretrained.PRETRAINED`) or a model directory, as for :meth:`load`.
        device, vocab
            As for :meth:`load`.

        Returns
        -------
        StellarLM

        Examples
        --------
        >>> from stellarlm import StellarLM
        >>> model = StellarLM.pretrained()
        >>> model.meta["format"]
        'stellarlm-model'
        """
        return cls.load(name_or_path, device=device, vocab=vocab)

    def finetune(self, table, new_tokens, out: str | os.PathLike, **options) -> StellarLM:
        """Teach this model new tokens from ``table`` (:func:`stellarlm.finetune.finetune`): write the
        fine-tuned model to ``out`` and return it, loaded on this model's device. This model is left
        as it is.

        Parameters
        ----------
        table : str, os.PathLike, astropy Table, pandas DataFrame or dict
            Rows of stars with known tokens and a column per new token (``NAME``, ``NAME_err``).
        new_tokens : str, NewToken or a list of them
            ``"NAME:UNIT[:DESCRIPTION]"`` strings, or :class:`stellarlm.finetune.NewToken`.
        out : str or os.PathLike
            Output directory.
        **options
            :func:`stellarlm.finetune.finetune`'s keywords (``resume``, ``progress``, ``config``) and
            :class:`stellarlm.finetune.FinetuneConfig`'s fields (``unfreeze_steps=500``, ...).

        Returns
        -------
        StellarLM

        Examples
        --------
        >>> tuned = StellarLM.pretrained().finetune("stars.fits", "mass:solMass", "runs/mass")  # doctest: +SKIP
        >>> tuned.query(stars, want=["mass", "teff"])                                          # doctest: +SKIP
        """
        from .finetune import finetune

        return StellarLM.load(finetune(self, table, new_tokens, out, **options), device=str(self.device))

    @property
    def names(self) -> list[str]:
        """Every token name the model's vocabulary holds (what may be given or asked).

        >>> StellarLM.pretrained().names[:2], len(StellarLM.pretrained().names)
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
        >>> model = StellarLM.pretrained()
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

        >>> model = StellarLM.pretrained()
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
        counts = present.sum(1)
        width = max(int(counts.max()), 1)
        order = np.argsort(~present, axis=1, kind="stable")[:, :width]
        mask = np.take_along_axis(present, order, 1)
        tok = ids[order]
        val = np.where(mask, np.take_along_axis(np.nan_to_num(vn), order, 1), 0.0)
        err = np.where(mask, np.take_along_axis(en, order, 1), 1.0)
        mask[counts == 0, 0] = True  # a star with nothing observed: attend to a dummy, answer blanked later
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

        >>> v = StellarLM.pretrained().embed({"g": [12.3], "bp": [12.9], "rp": [11.6]})
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

    def build_index(self, observed, kind: str = "auto", view: str | Sequence[str] | None = None,
                    columns: Sequence[str] = ("teff", "logg", "m_h"), batch_size: int = 4096,
                    progress: bool | None = None, meta: dict | None = None):
        """An :class:`~stellarlm.similarity.EmbeddingIndex` of the stars of ``observed`` (a table
        with a ``source_id`` column, or a :class:`~stellarlm.TokenTable`), tied to this model.

        ``view``: the tokens embedded (:data:`stellarlm.alignment.VIEWS` key such as ``"xp"``,
        ``"all"``, or a list of names; default ``"xp"`` for a TokenTable, every token column of
        a table otherwise). ``columns``: values kept to show beside each neighbour (those present).
        ``kind``: see :meth:`EmbeddingIndex.build <stellarlm.similarity.EmbeddingIndex.build>`.

        >>> from stellarlm import load_embedded
        >>> test = load_embedded().subset("test").subset(slice(0, 50))
        >>> index = StellarLM.pretrained().build_index(test, view="xp")
        >>> len(index), index.kind
        (50, 'exact')
        """
        from .alignment import view_names
        from .data.table import TokenTable
        from .similarity import EmbeddingIndex

        if isinstance(observed, TokenTable):
            names = view_names(view or "xp", observed.names)
            data = observed.observed(names)
            source_id = observed.source_id
            kept = {c: observed.column(c) for c in columns if c in observed.names}
        else:
            values, _, passthrough, _ = self._columns(observed)
            if "source_id" not in passthrough:
                raise BadValueError("build_index: the input needs a source_id column (what a neighbour is called)")
            names = view_names(view or "all", list(values))
            data = {k: v for k, v in _as_mapping(observed).items() if _token_of(k) in names}
            source_id = passthrough["source_id"]
            kept = {c: values[c] for c in columns if c in values}
        if not names:
            raise BadValueError(f"build_index: no token of view {view!r} in the input")
        vectors = self.embed(data, batch_size=batch_size, progress=progress)
        info = {"view": view if isinstance(view, str) or view is None else list(view), "tokens": len(names),
                "model_path": None if self.path is None else str(self.path), **(meta or {})}
        return EmbeddingIndex.build(vectors, source_id, self.model_sha256, columns=kept, kind=kind, meta=info)

    def similar(self, observed, k: int = 10, index=None, batch_size: int = 4096, nprobe: int | None = None):
        """The ``k`` stars of ``index`` most like each star of ``observed``, by cosine similarity of
        their embeddings (:meth:`embed`).

        ``index``: an :class:`~stellarlm.similarity.EmbeddingIndex` or its directory, built by this
        model (:meth:`build_index`, ``stellarlm index build``); one built by another model raises
        :class:`~stellarlm.errors.ConfigError`. A star whose ``source_id`` column matches a library
        star is not its own neighbour. The query may be any view: a LAMOST-like spectrum finds the
        stars of an XP library (how well depends on the model's alignment).

        Returns
        -------
        astropy.table.Table
            One row per (query star, neighbour): ``query`` (the input row), ``rank`` (1 = most
            similar), ``source_id`` and ``similarity`` of the neighbour, and the columns the index
            keeps (e.g. its ``teff``). A star with nothing observed gets no rows.

        >>> from stellarlm import load_embedded
        >>> model = StellarLM.pretrained()
        >>> test = load_embedded().subset("test").subset(slice(0, 50))
        >>> index = model.build_index(test, view="xp")
        >>> out = model.similar(test.subset(slice(0, 2)).observed(["teff", "logg", "m_h"]), k=3, index=index)
        >>> len(out), out.colnames[:4]
        (6, ['query', 'rank', 'source_id', 'similarity'])
        """
        from astropy.table import Table

        from .similarity import EmbeddingIndex

        if index is None:
            raise BadValueError("similar needs an index: StellarLM.build_index(...) or 'stellarlm index build'")
        if not isinstance(index, EmbeddingIndex):
            index = EmbeddingIndex.load(index, self.model_sha256)
        else:
            index.check_model(self.model_sha256)
        _, _, passthrough, n = self._columns(observed)
        vectors = self.embed(observed, batch_size=batch_size)
        ok = np.isfinite(vectors).all(1)
        exclude = None
        if "source_id" in passthrough:
            sid = np.asarray(passthrough["source_id"])
            if sid.dtype.kind in "iu":  # Gaia source_ids need all 64 bits: never through a float
                exclude = sid.astype(np.int64)[ok]
            else:
                sid = sid.astype(np.float64)
                exclude = np.where(np.isfinite(sid), sid, -1).astype(np.int64)[ok]
        rows, sims = index.search(vectors[ok], k, exclude=exclude, nprobe=nprobe)
        found = rows >= 0
        query = np.broadcast_to(np.flatnonzero(ok)[:, None], rows.shape)[found]
        rank = np.broadcast_to(np.arange(1, rows.shape[1] + 1)[None, :], rows.shape)[found]
        hit = rows[found]
        out = Table({"query": query, "rank": rank, "source_id": index.source_id[hit],
                     "similarity": sims[found].astype(np.float64)})
        for name, col in index.columns.items():
            out[name] = col[hit]
            if name in self.vocab and self.vocab[name].unit:
                import astropy.units as u

                out[name].unit = u.Unit(self.vocab[name].unit)
        return out

    def anomaly(self, observed, calibration: dict | None = None, batch_size: int = 512,
                progress: bool | None = None):
        """How surprised the model is by each star (:mod:`stellarlm.anomaly` has the details).

        For each group of tokens the star has (XP spectrum, LAMOST-like spectrum, labels,
        photometry), the mean NLL per token of its values when the model reads every other group
        (and G); each is turned into a robust z-score against validation stars given the same
        groups, and the star's ``anomaly`` is the largest. ``anomaly_percentile`` places it among
        validation stars with the same groups (99: only 1% of them look as odd).

        ``calibration``: a dict from :func:`stellarlm.anomaly.calibrate_anomaly`; default: the one
        in ``model.json`` (``stellarlm anomaly calibrate``), else one made on the embedded data's
        validation split at first use (a warning says so).

        Returns
        -------
        astropy.table.Table
            ``anomaly``, ``anomaly_percentile``, ``groups`` (the groups scored, e.g.
            ``xp+labels``), and per group ``z_<group>`` and ``nll_<group>`` (NaN where the star
            lacks it); the pass-through columns (``source_id``, ...) first.

        >>> from stellarlm import load_embedded
        >>> from stellarlm.anomaly import calibrate_anomaly
        >>> model = StellarLM.pretrained()
        >>> val = load_embedded().subset("val")
        >>> cal = calibrate_anomaly(model, val, max_stars=50)
        >>> out = model.anomaly(val.subset(slice(0, 3)).observed(val.names), calibration=cal)
        >>> out.colnames[:3], len(out)
        (['anomaly', 'anomaly_percentile', 'groups'], 3)
        """
        from astropy.table import Table

        from .anomaly import score

        values, errors, passthrough, n = self._columns(observed)
        self._check_trained(list(values))
        self._check_inputs(values, errors)
        cal = calibration or self.meta.get("anomaly_calibration") or self._default_anomaly_calibration()
        show = progress if progress is not None else n > 50_000
        result = score(self, values, errors, cal, batch_size, show)
        out = Table()
        for k, col in passthrough.items():
            out[k] = col
        for k in ("anomaly", "anomaly_percentile", "groups"):
            out[k] = result[k]
        for k, col in result.items():
            if k.startswith(("z_", "nll_")):
                out[k] = col
        return out

    def _default_anomaly_calibration(self) -> dict:
        """The anomaly calibration made once on the embedded validation split (cached)."""
        if self._anomaly_calibration is None:
            from .anomaly import calibrate_anomaly
            from .data.embedded import load_embedded
            from .errors import ConfigError, DataFileError

            warnings.warn("this model has no stored anomaly calibration (model.json: anomaly_calibration); "
                          "calibrating on the embedded data's validation split now (stored by 'stellarlm "
                          "anomaly calibrate --model ...')", stacklevel=3)
            try:
                val = load_embedded().subset("val")
            except (DataFileError, OSError) as exc:
                raise ConfigError(f"anomaly: no calibration stored with the model and no embedded data to make one "
                                  f"({exc}); run 'stellarlm data build' then 'stellarlm anomaly calibrate'") from exc
            val = val.select([n for n in val.names if n in self.trained_tokens])
            self._anomaly_calibration = calibrate_anomaly(self, val)
        return self._anomaly_calibration

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
        >>> model = StellarLM.pretrained()
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
            _refuse("phot_g_mean_mag", g, ~((g >= lo) & (g <= hi)),
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


def table_columns(observed, vocab: Vocabulary) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict, int]:
    """Split ``observed`` (an astropy Table, a pandas DataFrame or a dict of columns) into token
    values, token errors and pass-through columns, in the units of ``vocab``'s tokens; returns
    (values, errors, passthrough, n_rows). What :meth:`StellarLM.query` and fine-tuning read a
    table with: units converted, masked cells NaN, unknown names refused with suggestions."""
    from astropy.table import Table

    if isinstance(observed, Table):
        raw = {name: observed[name] for name in observed.colnames}
    elif hasattr(observed, "to_dict") and hasattr(observed, "columns"):  # pandas DataFrame
        raw = {str(c): observed[c].to_numpy() for c in observed.columns}
    elif isinstance(observed, Mapping):
        raw = {str(k): v for k, v in observed.items()}
    else:
        raise TypeError(f"observed must be an astropy Table, a pandas DataFrame or a dict, not {type(observed)}")
    cols = {}
    for name, col in raw.items():
        token = _token_of(name)
        if name in PASSTHROUGH or token not in vocab:
            cols[name] = _unmasked(getattr(col, "value", col))
        else:
            cols[name] = _token_values(name, token, col, vocab)
    if not cols:
        raise BadValueError("empty input: no columns given")
    lengths = {k: len(v) for k, v in cols.items()}
    n = next(iter(lengths.values()))
    if any(length != n for length in lengths.values()):
        raise BadValueError(f"columns have different lengths: {lengths}")
    if n == 0:
        raise BadValueError("empty input: no stars (rows) given")
    values, errors, passthrough = {}, {}, {}
    for name, col in cols.items():
        if name in PASSTHROUGH:
            passthrough[name] = col
            continue
        if col.ndim != 1:
            raise BadValueError(f"column {name!r} has shape {col.shape}; expected one value per star")
        base = _token_of(name)
        if base not in vocab:
            raise UnknownTokenError(name, vocab.names + [f"{x}_err" for x in vocab.names])
        (errors if name.endswith("_err") else values)[base] = col
    for name in errors:
        if name not in values:
            raise BadValueError(f"error column '{name}_err' given without a '{name}' column")
    return values, errors, passthrough, n


def _token_values(column: str, token: str, col, vocab: Vocabulary) -> np.ndarray:
    """A token's column as float64 in the token's unit, NaN where masked. Complex, boolean and
    non-numeric columns are refused (a cast would drop the imaginary part or read True as 1)."""
    data, mask = _split_mask(col)
    kind = np.asarray(getattr(data, "value", data)).dtype.kind
    if kind == "O":  # e.g. a pandas column of Python floats: numeric if every cell converts
        try:
            data, kind = np.asarray(data, dtype=np.float64), "f"
        except (TypeError, ValueError):
            pass
    if kind not in "fiu":
        what = {"c": "complex", "b": "boolean"}.get(kind, f"not numeric (dtype {np.asarray(data).dtype})")
        raise BadValueError(f"column {column!r} is {what}; expected real numbers (NaN for 'not observed')")
    if getattr(data, "unit", None) is not None:
        data = _to_token_unit(column, token, data, vocab)
    # no copy of a float64 column without a mask: a large query holds its input once
    arr = np.atleast_1d(np.asarray(getattr(data, "value", data), dtype=np.float64))
    if mask is not None:
        arr = arr.copy()
        arr[np.broadcast_to(mask, arr.shape)] = np.nan
    return arr


def _to_token_unit(column: str, token: str, col, vocab: Vocabulary) -> np.ndarray:
    """``col`` (a Column or Quantity with a unit, no mask) as an array in the token's unit."""
    import astropy.units as u

    unit = vocab[token].unit
    target = u.Unit(unit) if unit else u.dimensionless_unscaled
    log_of = LOG_TOKENS.get(token)
    if log_of is not None and _log_unit_of(col.unit, log_of):
        # log10 of a quantity in its cgs unit, as astronomers write it: u.Dex(x, u.cm / u.s**2), or a
        # FITS TUNIT 'log(cm.s**-2)' (which astropy reads as an unrecognised unit); an error column
        # in such a unit is a difference in dex
        return np.asarray(getattr(col, "value", col), dtype=np.float64)
    try:
        q = col.quantity if hasattr(col, "quantity") else u.Quantity(col)
        return q.to_value(target)
    except u.UnitConversionError:
        raise BadValueError(f"column {column!r} has unit {col.unit}, which cannot be converted to "
                            f"{target} (token {token!r})") from None


def check_values(values: dict, errors: dict, vocab: Vocabulary) -> None:
    """Refuse, column by column (no (n_stars, n_tokens) copy), what cannot be an observation:
    an infinite value, a value outside the token's physical range (:meth:`Vocabulary.valid_range`),
    an uncertainty beside a value that is not > 0, infinite, or wider than that range. NaN is "not observed" (a NaN
    uncertainty: the typical one). The message names the column and the first bad row."""
    for name, v in values.items():
        lo, hi = vocab.valid_range(name)
        with np.errstate(invalid="ignore"):
            _refuse(name, v, np.isinf(v), "is infinite; use NaN for 'not observed'")
            _refuse(name, v, (v < lo) | (v > hi), f"lies outside the valid range of {name!r}, "
                    f"{lo:g} to {hi:g} {vocab[name].unit}; use NaN for 'not observed'")
            if name in errors:
                e = errors[name]
                given = np.isfinite(v) & ~np.isnan(e)
                _refuse(f"{name}_err", e, given & ~(e > 0), "is not a positive uncertainty (negative, zero)")
                _refuse(f"{name}_err", e, given & np.isinf(e), "is an infinite uncertainty; use NaN for "
                        "'unknown' (the typical error is assumed) or leave the value out")
                # wider than every possible value: no information, and it overflows the model units
                _refuse(f"{name}_err", e, given & (e > hi - lo), f"is an uncertainty wider than the valid "
                        f"range of {name!r} ({hi - lo:g} {vocab[name].unit}); leave the value out")
    observed = np.zeros(len(next(iter(values.values()))), dtype=bool)
    for v in values.values():
        observed |= np.isfinite(v)
    if not observed.any():
        raise BadValueError("no star has any observed (non-NaN) token")


def read_star_table(path, format: str | None = None, keep: Sequence[str] = (), g_mag: float | None = None,
                    synthetic_g: bool = False, truncate: bool = False, keep_if_present: Sequence[str] = ()):
    """Read a table of stars from a file as ``stellarlm query --input`` does: a table whose columns
    are token names (+ ``name_err``) in any format astropy reads (FITS, ECSV, CSV, Parquet, ...;
    ``format`` if the extension does not say), or a Gaia archive XP file (XP_CONTINUOUS with
    ``bp_coefficients``, XP_SAMPLED with ``wavelength``/``flux``) turned into XP tokens + G by the
    same readers as the Python API; then ``source_id`` and ``g_source`` are kept, and the other
    columns named in ``keep`` (and those of ``keep_if_present`` that the file has) copied row for
    row. ``g_mag`` (one star) or ``synthetic_g``: G for an XP
    file that has none; ``truncate``: use each band's ``n_relevant_bases`` only.

    Returns (table, the names of the columns made from an XP file to keep). Raises
    :class:`DataFileError` naming the file for a file that is missing, damaged or lacks a ``keep`` column.
    """
    from pathlib import Path

    from astropy.table import Table

    from .data.gaia_xp import _column_lookup, sampled_table_to_tokens, xp_table_to_tokens
    from .errors import DataFileError
    from .integrity import check_gzip

    if not Path(path).exists():
        raise DataFileError(path, "no such file")
    check_gzip(path)  # a damaged .gz can otherwise decode to plausible numbers
    try:
        observed = Table.read(path, format=format) if format else Table.read(path)
    except Exception as exc:
        raise DataFileError(path, f"cannot read input table ({exc})") from exc
    missing = [c for c in keep if c not in observed.colnames]
    if missing:
        raise DataFileError(path, f"--keep {' '.join(missing)}: no such column (columns: "
                                  f"{', '.join(observed.colnames[:12])})")
    cols = _column_lookup(observed)
    g = "synthetic" if synthetic_g else (None if g_mag is None else [g_mag] * len(observed))
    if "bp_coefficients" in cols:
        tokens = xp_table_to_tokens(observed, path, g_mag=g, truncate=truncate)
    elif "wavelength" in cols and "flux" in cols:
        tokens = sampled_table_to_tokens(observed, path, g_mag=None if g is None else [g_mag])
    else:
        return observed, []
    table = tokens.to_table()
    table.remove_columns(["star_id", "split"])
    table["g_source"] = tokens.meta["g_source_per_star"]
    for c in [*keep, *(c for c in keep_if_present if c in observed.colnames and c not in keep)]:
        if c not in table.colnames:  # other columns of the archive file the user asked for, row for row
            if len(observed) != len(table):  # XP_SAMPLED: one star, a row per wavelength
                raise DataFileError(path, f"--keep {c}: an XP_SAMPLED file has one row per wavelength")
            table[c] = observed[c]
    return table, ["source_id", "g_source"]


def _as_mapping(observed) -> dict:
    """The columns of an astropy Table, a DataFrame or a dict, as a dict (no copies)."""
    from astropy.table import Table

    if isinstance(observed, Table):
        return {name: observed[name] for name in observed.colnames}
    if hasattr(observed, "to_dict") and hasattr(observed, "columns"):
        return {str(c): observed[c].to_numpy() for c in observed.columns}
    return dict(observed)


def _refuse(column: str, values: np.ndarray, bad: np.ndarray, problem: str) -> None:
    """BadValueError naming ``column`` and its first ``bad`` row, if there is one."""
    if bad.any():
        i = int(np.argmax(bad))
        raise BadValueError(f"column {column!r}, row {i}: {values[i]!r} {problem}"
                            + (f" ({int(bad.sum())} rows in all)" if bad.sum() > 1 else ""))


# Tokens that are log10 of a physical quantity (token unit "dex"), and that quantity's unit.
LOG_TOKENS = {"logg": "cm s-2"}


def _log_unit_of(unit, physical: str) -> bool:
    """Is ``unit`` log10 of exactly ``physical``: ``u.dex(u.cm / u.s**2)`` (a LogUnit), or text such as
    ``log(cm.s**-2)`` / ``dex(cm/s2)`` that astropy leaves unrecognised? Another scale (log of m s^-2)
    is not accepted here: it would shift every value."""
    import astropy.units as u

    target = u.Unit(physical)
    if isinstance(unit, u.LogUnit):
        return unit.physical_unit == target and unit.function_unit == u.dex
    text = str(unit).replace(" ", "")
    for prefix in ("log(", "log10(", "dex(", "[", "log", "dex"):
        if text.startswith(prefix):
            inner = text[len(prefix):].rstrip(")]")
            try:
                return u.Unit(inner.replace(".", " "), parse_strict="silent") == target
            except ValueError:
                return False
    return False


def _relevant_bases(n_relevant, n_stars: int, what: str) -> np.ndarray:
    """(n_stars,) counts of relevant bases (all 55 for None); a bad count raises BadValueError."""
    if n_relevant is None:
        return np.full(n_stars, N_XP)
    try:
        return relevant_bases_counts(n_relevant, n_stars)
    except ValueError as exc:
        raise BadValueError(f"{what} {exc}") from exc
