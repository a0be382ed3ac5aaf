"""Fine-tuning: teach a trained model new tokens from a table of your own stars.

A new token (say ``mass`` in solar masses, or a survey's own label) is appended to the vocabulary
with the next free id (:meth:`Vocabulary.add_token`: normalised by the robust median and MAD of its
values in the table's training rows, as the built-in tokens are by the embedded data's) and the
network grows by one row in each per-token table (:meth:`StellarTransformer.with_new_tokens`):
every existing id, embedding and answer is untouched. The table gives the rows' known tokens (XP
spectra, photometry, labels, ...) and the new columns (``NAME``, optional ``NAME_err``); it is
split into training, validation and test parts (or its ``split`` column says which), and the model
is trained in up to two stages:

(a) **frozen**: only the new tokens' rows are trained (their value, error, offset and name
    embeddings and their query vectors); the backbone and every old row stay fixed, so every answer
    about the old tokens stays bit-identical;
(b) **unfrozen** (optional, ``unfreeze_steps`` > 0): everything, at a low learning rate, starting
    from (a)'s best weights.

Each stage stops early when the validation loss of the new tokens (their Gaussian NLL asked given
random subsets of the known tokens, on fixed draws) has not improved for ``patience`` evaluations;
the best weights seen are what is written. Training samples are drawn by
:func:`stellarlm.training.sample_batch` over the known tokens, as in pretraining (so the new token
is asked given XP + G, given photometry, given anything), and each new token of a row is then
added as a target, or with probability ``p_new_input`` as one more input (so it can be given, and
the model learns what it says about the others). The loss is pretraining's (beta-NLL,
:func:`stellarlm.model.gaussian_nll`); checkpoints, ``--resume``, the run lock and ``metrics.jsonl``
are :mod:`stellarlm.training`'s. The output directory is an ordinary model (``model.safetensors`` +
``model.json`` with the grown vocabulary, ``checksums.json``) that :meth:`StellarLM.load` opens;
the new tokens are then given or asked like any other.

A new token's rows start as a copy of those of the trained token (a label, a magnitude, ...) whose
values or answers on the training rows correlate best with it (``init_from="auto"``, if r >=
``init_min_corr``; :func:`initial_rows`), else drawn like the trained labels' rows: a new
temperature scale starts as ``teff``, and a few dozen rows only have to teach the difference.

Why stage (b) unfreezes everything at a low learning rate rather than adding low-rank adapters
(LoRA): adapters pay off when the full weights are too large to train or to store once per task.
The network here has 0.54 M parameters (2 MB on disk): training all of them needs no more memory
than pretraining did, and a fine-tuned copy is as small as the original. Its matrices are
narrow (96 x 96 in the default model), so a rank-8 adapter is already a sixth of the matrix it
adapts and saves little while adding module types, a merge step and a second file format that
``StellarLM.load``, ``stellarlm label`` and the benchmarks would all have to learn. Neither keeps
the old answers as they were (an adapter changes the shared matrices' output for every token
alike); what does is stage (a), which is the default, and stage (b)'s low rate, early stopping on
the new tokens' validation loss and its log of the old tokens' validation loss (``val_loss_old``
in ``metrics.jsonl``) keep and show how far it moves. A model whose backbone changed loses the
base model's sigma calibration (``sigma_*``; rerun ``stellarlm calibrate`` for the built-in labels).

The new tokens' sigmas are calibrated on the validation part (``calibrate``, default on;
:func:`stellarlm.calibration.calibrate_rows`): per kind of input, a factor on the width, and with
200 validation rows or more a tail component too. A network that has just learnt a quantity from a
few hundred rows is over-confident about it (z std 1.2-1.8 in ``benchmarks/finetune_pays.py``).

Example
-------
>>> from stellarlm import StellarLM
>>> from stellarlm.finetune import finetune
>>> out = finetune("default", "my_stars.fits", ["mass:solMass:stellar mass"], "runs/mass")  # doctest: +SKIP
>>> StellarLM.load(out).query(stars, want=["mass"])                                        # doctest: +SKIP

Each bad input is refused before any training (:mod:`stellarlm.errors`): a new name that exists
already or cannot be a column name, a unit astropy cannot read, a spectral group, a bad option
(``ConfigError``); a file that is missing or unreadable, or lacks a new token's column
(``DataFileError``; ``BadValueError`` for a table passed in memory); a column with no finite value,
a unit that does not convert, too few rows for a training and a validation part, columns that are
neither tokens nor new tokens, known tokens the base model was not trained on (``BadValueError``).

The package, one idea per module: :mod:`~stellarlm.finetune.config` (NewToken, FinetuneConfig),
:mod:`~stellarlm.finetune.table` (the user's table and its split), :mod:`~stellarlm.finetune.sampling`
(the batches) and :mod:`~stellarlm.finetune.run` (the stages, calibration, the model written).
Every name stays importable from ``stellarlm.finetune``.
"""

from __future__ import annotations

from .config import (_FINETUNE_CHECKS, _FINETUNE_RUNTIME, FinetuneConfig, ID_COLUMNS, input_groups, new_tokens_of,
    NewToken, SPECTRAL_GROUPS, validate_finetune_config)  # noqa: F401
from .table import (_colnames, _columns_of, _errors_of, _source_ids, _split, prepare_table)  # noqa: F401
from .sampling import (_draw, _validation_batches, FinetuneData, sample_finetune_batch, validation_loss)  # noqa: F401
from .run import (_calibrate_new, _finetune_locked, _frozen_rows, _load_base, _optimizer, _run_data_id,
    _sampling_config, _stages, _summary, _test_scores, _trainable, finetune, initial_rows)  # noqa: F401
