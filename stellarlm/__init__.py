"""stellarlm: a foundation model for stars, one named token per observation.

Public API::

    from stellarlm import Vocabulary, TokenTable, load_embedded
"""

from .data.table import TokenTable
from .errors import (BadValueError, ConfigError, DataFileError, StellarLMError, UnknownTokenError,
                     VocabularyMismatchError)
from .vocab import Token, Vocabulary

__all__ = ["StellarLM", "Vocabulary", "Token", "TokenTable", "load_embedded", "StellarLMError", "UnknownTokenError",
           "DataFileError", "VocabularyMismatchError", "BadValueError",
           "ConfigError"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "StellarLM":  # imported lazily: it pulls in torch
        from .query import StellarLM

        return StellarLM
    raise AttributeError(f"module 'stellarlm' has no attribute {name!r}")


def load_embedded(cache_dir=None) -> TokenTable:
    """The embedded default data set (real Gaia XP + APOGEE stars), built on first use."""
    from .data.embedded import load_embedded as _load

    return _load(cache_dir)
