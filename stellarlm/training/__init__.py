"""Training a stellarlm model: ``train(table, TrainConfig(...))``, one idea per module.

- :mod:`~stellarlm.training.config`: TrainConfig, its checks, the device;
- :mod:`~stellarlm.training.data`: the training set as normalised arrays (NormalisedData);
- :mod:`~stellarlm.training.sampler`: the random-subset sampler (what is given, what is asked);
- :mod:`~stellarlm.training.loss`: the NLL of a batch over CPU sub-batches, the alignment term;
- :mod:`~stellarlm.training.distributed`: torchrun / DistributedDataParallel ranks;
- :mod:`~stellarlm.training.checkpoint`: model files and checkpoints that resume exactly;
- :mod:`~stellarlm.training.loop`: the schedule, validation and :func:`train`.

Every name stays importable from ``stellarlm.training``, as it was before the package was split.
"""

from .config import (_check_options, _CHECKS, _COUNT, _MODEL_CHECKS, _PROB, pick_device, stem_blocks, TrainConfig,
    validate_config)  # noqa: F401
from .data import (_block_of, _map_arrays, _WHOLE_SPECTRUM, NORMALISED_FORMAT, NormalisedData)  # noqa: F401
from .sampler import (_draw, sample_batch)  # noqa: F401
from .loss import (_buckets, _INPUT_KEYS, _nll_sum, _shares, alignment_backward, batch_loss, loss_backward,
    parallel_backward, token_betas, worker_pool)  # noqa: F401
from .distributed import (_destroy_process_group, _launched_by_torchrun, _Processes, _processes, _rank_rows,
    distributed_backward)  # noqa: F401
from .checkpoint import (_brief, _check_same_run, _config_dict, _data_id, _latest_name, _load_checkpoint, _phase,
    _run_lock, _RUNTIME_OPTIONS, _save_checkpoint, _STEP_DIR, _trim_metrics, _write_model_files, CHECKPOINT_DIR,
    latest_checkpoint, LATEST_FILE, load_model, LOCK_FILE, META_FILE, save_model, STATE_FILE, typical_errors,
    vocabulary_fingerprint, warm_start, WEIGHTS_FILE)  # noqa: F401
from .loop import (_train_locked, evaluate, lr_at, train)  # noqa: F401
