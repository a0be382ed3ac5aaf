"""Exceptions raised by stellarlm.

Every error names the offending token, file or column so that a user can fix the input without
reading the source.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class StellarLMError(Exception):
    """Base class of every error stellarlm raises on purpose: catch it to handle any of them.

    >>> from stellarlm import StellarLM
    >>> try:
    ...     StellarLM.pretrained().query({"tef": [4800.0]}, ["logg"])
    ... except StellarLMError as exc:
    ...     print(type(exc).__name__, "-", "did you mean 'teff'" in str(exc))
    UnknownTokenError - True
    """


class UnknownTokenError(StellarLMError, KeyError):
    """A token name that is not in the vocabulary.

    The message suggests the closest known names, e.g. ``'tef'`` -> ``did you mean 'teff'?``.
    """

    def __init__(self, name: str, known: Iterable[str] = ()):
        self.name = name
        close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"unknown token name {name!r}{hint}")

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return self.args[0]


class DataFileError(StellarLMError, ValueError):
    """A survey or cache file that cannot be read as promised: names the file and the column."""

    def __init__(self, path, problem: str, column: str | None = None):
        self.path = str(path)
        self.column = column
        where = f"{self.path}" + (f", column {column!r}" if column else "")
        super().__init__(f"{where}: {problem}")


class VocabularyMismatchError(StellarLMError, ValueError):
    """A table or checkpoint built with a vocabulary that disagrees with the one in use."""


class BadValueError(StellarLMError, ValueError):
    """An input value that is present but unusable (infinite, wrong shape, wrong unit, ...)."""


class ConfigError(StellarLMError, ValueError):
    """A training or query option that cannot work (out of range, inconsistent with another option,
    or changed since the checkpoint being resumed): names the option."""
