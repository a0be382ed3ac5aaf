"""StellarLM: ask a trained model for any tokens given any others (the public face of stellarlm).

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

The questions themselves are asked by :class:`stellarlm.predictor.Predictor` (load, query,
predictive, embed, labels_from_xp); StellarLM adds what stands above a question: fine-tuning,
similarity indexes and anomaly scores.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

from .errors import BadValueError
from .predictor import Predictor
from .star_table import as_mapping, token_of
from .vocab import Vocabulary


class StellarLM(Predictor):
    """A trained stellarlm model with its vocabulary, behind a query API (:class:`~stellarlm.predictor.Predictor`),
    able to fine-tune, build a similarity index and score anomalies."""

    def __init__(self, model, vocab: Vocabulary, meta: dict, device: str = "auto"):
        super().__init__(model, vocab, meta, device)
        self._anomaly_calibration = None  # made on first use of anomaly() when model.json has none

    @classmethod
    def pretrained(cls, name_or_path: str | os.PathLike = "default", device: str = "auto",
                   vocab: Vocabulary | None = None) -> StellarLM:
        """The shipped model by name, from any working directory (as transformers' ``from_pretrained``).

        The weights come with the package (package data ``stellarlm.models_default``; the
        repository's ``models/default`` in a source checkout), so nothing is downloaded.

        Parameters
        ----------
        name_or_path : str or os.PathLike
            ``"default"``, another shipped model (``"lamost_dr10"``; see
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
            data = {k: v for k, v in as_mapping(observed).items() if token_of(k) in names}
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
