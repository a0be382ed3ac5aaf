"""Where the shipped models live: ``models/default`` in a source checkout, else package data.

The default model (``model.safetensors``, ``model.json`` and its ``README.md``) is installed with
the wheel as the package data ``stellarlm.models_default``, so ``StellarLM.load("default")`` works
after a plain ``pip install`` from any working directory. In a source checkout or an editable
install the repository's ``models/default`` is used, the same way :func:`stellarlm.vocab.default_vocab_path`
finds ``vocab/tokens.json``. The second shipped model, ``lamost_dr10`` (the default taught real
LAMOST DR10 spectra; ``models/lamost_dr10/README.md``), is found the same way. This module does
not import torch.

Example
-------
>>> from stellarlm.pretrained import PRETRAINED, default_model_path, resolve_model_path
>>> PRETRAINED
('default', 'lamost_dr10')
>>> sorted(p.name for p in default_model_path().iterdir() if p.name.startswith("model."))
['model.json', 'model.safetensors']
>>> resolve_model_path("default") == default_model_path()
True
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

# names that StellarLM.load / StellarLM.pretrained accept besides directories: the default model, and
# the default fine-tuned on real LAMOST DR10 spectra (its card: models/lamost_dr10/README.md)
PRETRAINED = ("default", "lamost_dr10")
_META_FILE = "model.json"  # as stellarlm.training.META_FILE (not imported: that module pulls in torch)


def default_model_path() -> Path:
    """The directory of the shipped default model.

    The repository's ``models/default`` in a source checkout or an editable install, else the copy
    installed as package data ``stellarlm.models_default``.

    Returns
    -------
    pathlib.Path
        A directory holding ``model.json`` and ``model.safetensors``.

    Examples
    --------
    >>> from stellarlm.pretrained import default_model_path
    >>> (default_model_path() / "model.json").is_file()
    True
    """
    return shipped_model_path("default")


def shipped_model_path(name: str) -> Path:
    """The directory of the shipped model ``name`` (one of :data:`PRETRAINED`): the repository's
    ``models/<name>`` in a source checkout, else the package data ``stellarlm.models_<name>``.

    >>> (shipped_model_path("lamost_dr10") / "model.json").is_file()
    True
    """
    if name not in PRETRAINED:
        raise ValueError(f"{name!r} is not a shipped model; the shipped models: {', '.join(PRETRAINED)}")
    repo_dir = Path(__file__).resolve().parent.parent / "models" / name
    if (repo_dir / _META_FILE).exists():
        return repo_dir
    return Path(str(resources.files(f"stellarlm.models_{name}").joinpath(_META_FILE))).parent


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """The model directory that ``name_or_path`` stands for.

    As in transformers' ``from_pretrained``, an existing local directory wins; otherwise a name in
    :data:`PRETRAINED` (``"default"``, ``"lamost_dr10"``) means that shipped model. Anything else is returned as a path
    (loading it then reports the missing files).

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A model directory (one written by ``stellarlm train``) or the name of a shipped model.

    Returns
    -------
    pathlib.Path
        The model directory.

    Examples
    --------
    >>> from stellarlm.pretrained import resolve_model_path
    >>> (resolve_model_path("default") / "model.safetensors").is_file()
    True
    >>> resolve_model_path("runs/my_model").as_posix()
    'runs/my_model'
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if isinstance(name_or_path, str) and name_or_path in PRETRAINED:
        return shipped_model_path(name_or_path)
    return path
