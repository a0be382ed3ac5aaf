"""Model files and checkpoints that resume exactly: atomic saves, checksums, the run lock.

Checkpoints: ``<out>/checkpoint/step-000500/`` holds the weights (safetensors), a JSON file with
the model config, the vocabulary and its normalisation statistics, the optimiser and RNG state,
and ``checksums.json`` (SHA-256 of each). A save writes a new ``step-*.partial`` directory, renames
it whole, then switches the one-line pointer ``<out>/checkpoint/latest`` (temporary file +
``os.replace``) and only then deletes the previous checkpoint: a kill at any moment of a save
leaves ``latest`` naming a complete checkpoint. ``resume=True`` continues from it (checksums
verified): same step, optimiser and RNG state, so the resumed run ends with the same weights as an
uninterrupted one. A resume with other options or other training data is refused
(:class:`~stellarlm.errors.ConfigError`) unless ``allow_config_change``; a lock file on ``<out>``
stops a second training from writing into the same directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ConfigError, DataFileError, VocabularyMismatchError
from ..integrity import CHECKSUM_FILE, atomic_write, sha256_file, verify_checksums, write_checksums
from ..model import ModelConfig, StellarTransformer
from ..vocab import Vocabulary
from .config import TrainConfig
from .data import NormalisedData


CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
STATE_FILE = "train_state.pt"
LATEST_FILE = "latest"  # one line: the name of the newest complete checkpoint directory
LOCK_FILE = "train.lock"
_STEP_DIR = re.compile(r"^step-\d{6,}$")


# --- checkpoints -------------------------------------------------------------------------------
def _phase(name: str) -> None:
    """Called after each phase of a save (``weights``, ``meta``, ``state``, ``checksums``,
    ``rename``, ``pointer``, ``cleanup``): a no-op that the kill tests replace with one that dies
    there, as a SIGKILL would."""


def typical_errors(data: NormalisedData, vocab: Vocabulary) -> dict[str, float]:
    """Median normalised error of each token in the training data: the error a query assumes for
    a value given without one."""
    med = torch.nanmedian(data.errors, dim=0).values
    return {vocab[int(i)].name: float(m) for i, m in zip(data.ids, med) if math.isfinite(float(m))}


def vocabulary_fingerprint(vocab: Vocabulary) -> str:
    """SHA-256 of what the weights depend on in a vocabulary: each token's id, name, group, unit and
    normalisation. Stored in the weights file, it ties the weights to their ``model.json``: a
    description edited by hand changes nothing, teff and logg swapped are refused."""
    rows = [(t.id, t.name, t.group, t.unit, repr(float(t.centre)), repr(float(t.scale))) for t in vocab.tokens]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _write_model_files(directory: Path, model: StellarTransformer, vocab: Vocabulary, extra: dict) -> list[str]:
    """Weights (with the vocabulary's fingerprint) and ``model.json`` in ``directory``; their names."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"vocabulary_sha256": vocabulary_fingerprint(vocab)}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata=metadata))
    _phase("weights")
    meta = {"format": "stellarlm-model", "version": 1, "config": model.cfg.to_dict(),
            "vocabulary": json.loads(vocab.to_json()), **extra}
    atomic_write(directory / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))
    _phase("meta")
    return [WEIGHTS_FILE, META_FILE]


def save_model(directory: Path, model: StellarTransformer, vocab: Vocabulary, extra: dict) -> None:
    """Weights (safetensors) + JSON (config, vocabulary, statistics, provenance), each atomically,
    then ``checksums.json``: a kill between the files leaves checksums that do not match, which
    :func:`load_model` reports, rather than a silent mix of two models."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_checksums(directory, _write_model_files(directory, model, vocab, extra))


def load_model(directory: str | os.PathLike, vocab: Vocabulary | None = None
               ) -> tuple[StellarTransformer, Vocabulary, dict]:
    """Read a model written by :func:`save_model`. If ``vocab`` is given it must match the
    checkpoint's token for token (ids and names); otherwise :class:`VocabularyMismatchError`.

    Checksums (``checksums.json``) are verified when present, and the vocabulary of ``model.json``
    must be the one the weights were trained with (fingerprint in the weights file, when present);
    a damaged or mismatched file raises :class:`DataFileError` naming it."""
    from safetensors import safe_open

    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.exists():
            raise DataFileError(p, "checkpoint file missing")
    verify_checksums(directory)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "stellarlm-model":
            raise ValueError("missing format tag 'stellarlm-model'")
        ckpt_vocab = Vocabulary.from_json(json.dumps(meta["vocabulary"]))
        # models written before these options existed: no value offset, one Gaussian per answer
        cfg = ModelConfig(**{"value_offset": False, "n_components": 1, **meta["config"]})
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise DataFileError(meta_path, f"not a stellarlm model description ({type(exc).__name__}: {exc})") from exc
    if vocab is not None:
        theirs = [(t.id, t.name) for t in ckpt_vocab.tokens]
        ours = [(t.id, t.name) for t in vocab.tokens]
        if theirs != ours[: len(theirs)] or len(ours) != len(theirs):
            diff = next(((a, b) for a, b in zip(theirs, ours) if a != b), (len(theirs), len(ours)))
            raise VocabularyMismatchError(f"{meta_path}: checkpoint vocabulary differs from the one in use "
                                          f"(first difference: {diff[0]} vs {diff[1]})")
    model = StellarTransformer(cfg)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            expected = (f.metadata() or {}).get("vocabulary_sha256")
            state = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict(state)
    except Exception as exc:
        raise DataFileError(weights_path, f"corrupt or mismatched weights ({exc})") from exc
    if expected is not None and expected != vocabulary_fingerprint(ckpt_vocab):
        raise DataFileError(meta_path, f"its vocabulary is not the one the weights in {weights_path.name} were "
                                       "trained with (tokens renamed, reordered or renormalised)")
    return model.eval(), ckpt_vocab, meta


def warm_start(model: StellarTransformer, source: str | os.PathLike, vocab: Vocabulary) -> dict:
    """Copy the weights of the model in ``source`` into ``model`` (a new run's network), and say
    where they came from. Everything must match (vocabulary and normalisation, architecture) but
    what adds weights or only regroups tokens:

    * an alignment head (``align_dim``) or a spectrum stem (``stem_tokens``, ``stem_on``) that the
      source lacks starts new. A new stem's last layer starts at zero, so its tokens begin as
      blank (identical) encoder tokens rather than random ones;
    * other patches (``patch_size``, ``lamost_patch_size``): the per-token weights are the same
      shape whichever tokens share a patch.

    Raises ConfigError naming what differs.

    >>> cfg = TrainConfig(init_from="models/default", align_weight=0.1)  # doctest: +SKIP
    """
    loaded, their_vocab, meta = load_model(source)
    if vocabulary_fingerprint(their_vocab) != vocabulary_fingerprint(vocab):
        raise ConfigError(f"--init-from {source}: its vocabulary or normalisation is not the training data's")
    ours, theirs = model.cfg.to_dict(), loaded.cfg.to_dict()
    may_differ = {"align_dim", "patch_of"} | ({"stem_of", "stem_tokens", "stem_hidden"} if loaded.stem is None else set())
    differ = sorted(k for k in ours if k not in may_differ and ours[k] != theirs.get(k))
    if differ:
        raise ConfigError(f"--init-from {source}: the architecture differs in {', '.join(differ)} "
                          f"(leave those options out to take the model's own)")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    stray = [k for k in missing + unexpected if not k.startswith(("align_head.", "stem."))]
    if unexpected or stray:
        raise ConfigError(f"--init-from {source}: its weights do not fit the new model ({(unexpected or stray)[:3]}); "
                          "a model with an alignment head can only start a run that keeps it (--align-dim)")
    if model.stem is not None and any(k.startswith("stem.") for k in missing):
        with torch.no_grad():
            for mlp in model.stem.mlp:
                mlp[-1].weight.zero_()
                mlp[-1].bias.zero_()
    return {"path": str(source), "step": meta.get("step"), "new": sorted({k.split(".")[0] for k in missing}),
            "model_sha256": sha256_file(Path(source) / WEIGHTS_FILE)}


def _save_checkpoint(out: Path, model, vocab, opt, gen: torch.Generator, step: int, cfg: TrainConfig,
                     extra: dict, data_id: dict | None = None, window: tuple = ([], []), world_size: int = 1,
                     extra_state: dict | None = None) -> None:
    """A complete checkpoint directory ``step-NNNNNN``, then the ``latest`` pointer switched to it,
    then the previous one removed (see the module doc). ``window``: the losses and gradient norms
    since the last log line, so a resumed run logs the same numbers as an uninterrupted one;
    ``extra_state``: more of a run's state, stored with the optimiser's (fine-tuning: its stage,
    early-stopping counters and best weights so far)."""
    root = out / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = root / name
    if final.exists() and _latest_name(root) == name:
        return  # this very step is already the complete latest checkpoint
    partial = root / (name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
    partial.mkdir()
    names = _write_model_files(partial, model, vocab, {**extra, "step": step})
    state = {"step": step, "optimizer": opt.state_dict(), "generator": gen.get_state(),
             "torch_rng": torch.get_rng_state(), "train_config": _config_dict(cfg), "data": data_id,
             "window": [list(w) for w in window], "world_size": world_size, **(extra_state or {})}
    atomic_write(partial / STATE_FILE, lambda p: torch.save(state, p))
    _phase("state")
    write_checksums(partial, names + [STATE_FILE])
    _phase("checksums")
    shutil.rmtree(final, ignore_errors=True)  # complete, but never pointed at: a killed run's
    os.replace(partial, final)
    _phase("rename")
    atomic_write(root / LATEST_FILE, lambda p: p.write_text(name + "\n"))
    _phase("pointer")
    for old in root.iterdir():  # the previous checkpoint, and anything a killed save left
        if old.is_dir() and old.name != name and (_STEP_DIR.match(old.name) or old.name.endswith(".partial")):
            shutil.rmtree(old, ignore_errors=True)
    _phase("cleanup")


def _latest_name(root: Path) -> str | None:
    """The checkpoint directory ``root/latest`` names, or None without a pointer."""
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(pointer, f"unreadable checkpoint pointer ({type(exc).__name__}: {exc})") from exc
    if not _STEP_DIR.match(name):
        raise DataFileError(pointer, f"not a checkpoint pointer (expected 'step-NNNNNN', got {name[:40]!r})")
    return name


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run in ``out``, or None if it has none. A run
    written before checkpoint directories existed: ``<out>/checkpoint`` itself."""
    root = Path(out) / CHECKPOINT_DIR
    name = _latest_name(root)
    if name is None:
        return root if (root / STATE_FILE).exists() else None
    if not (root / name).is_dir():
        raise DataFileError(root / LATEST_FILE, f"points at {name}, which does not exist")
    return root / name


def _load_checkpoint(ckpt: Path, vocab: Vocabulary) -> tuple[StellarTransformer, dict, dict]:
    """The weights, training state and ``model.json`` of a checkpoint directory, all verified."""
    if ckpt.name != CHECKPOINT_DIR and not (ckpt / CHECKSUM_FILE).exists():
        raise DataFileError(ckpt / CHECKSUM_FILE, "checksum file missing (incomplete checkpoint)")
    loaded, _, meta = load_model(ckpt, vocab)  # verifies the checksums of all the files
    try:
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        step = state["step"]
    except Exception as exc:
        raise DataFileError(ckpt / STATE_FILE, f"corrupt training state ({type(exc).__name__}: {exc})") from exc
    if meta.get("step") != step:
        raise DataFileError(ckpt, f"weights (step {meta.get('step')}) and state (step {step}) disagree")
    return loaded, state, meta


# Options that say how to run, not what to compute: they may change on --resume. (workers and
# n_buckets change the order of sums, so a resume with others is equivalent but not bit-identical.)
_RUNTIME_OPTIONS = ("out_dir", "device", "threads", "workers", "n_buckets", "max_minutes", "eval_every",
                    "checkpoint_every")


def _check_same_run(ckpt: Path, state: dict, cfg: TrainConfig, data_id: dict,
                    runtime: tuple[str, ...] = _RUNTIME_OPTIONS) -> None:
    """Refuse to resume a checkpoint with other options (other than ``runtime``) or other training
    data (ConfigError)."""
    before, now = state.get("train_config") or {}, _config_dict(cfg)
    changed = [k for k in now if k not in runtime and k in before and before[k] != now[k]]
    if "model" in changed:
        changed.remove("model")
        changed += [f"model.{k}" for k in now["model"] if before["model"].get(k) != now["model"][k]]
    if changed:
        shown = ", ".join(f"--{k.split('.')[-1].replace('_', '-')} {_brief(before, k)} -> {_brief(now, k)}"
                          for k in changed[:5])
        raise ConfigError(f"{ckpt}: --resume with changed options ({shown}); resume with the same options, "
                          "or pass --allow-config-change (allow_config_change=True) to continue anyway")
    if state.get("data") and state["data"] != data_id:
        raise ConfigError(f"{ckpt}: --resume on other training data ({state['data']['n_stars']} stars before, "
                          f"{data_id['n_stars']} now, or other values: --max-stars, --without or the data cache "
                          "changed); pass --allow-config-change to continue anyway")


def _brief(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    text = repr(d)
    return text if len(text) < 40 else text[:37] + "..."


def _data_id(data: NormalisedData) -> dict:
    """What identifies the training data of a run: its size and a hash of its values and errors."""
    h = hashlib.sha256()
    for x in (data.ids, data.values, data.errors):
        h.update(x.numpy().tobytes())
    return {"n_stars": len(data), "sha256": h.hexdigest()}


def _trim_metrics(path: Path, step: int) -> None:
    """Drop the log lines after ``step`` (written by a run killed after its last checkpoint), so a
    resumed run's log has each step once."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # half a line, written as the run was killed
    atomic_write(path, lambda p: p.write_text("".join(k + "\n" for k in keep)))


@contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>/train.lock`` (an OS lock, released when the process ends, even killed) so two
    trainings cannot write into one directory; the second gets a ConfigError at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    with open(out / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"{out}: another training is writing into this --out directory "
                              f"(it holds {out / LOCK_FILE}); wait for it or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _config_dict(cfg) -> dict:
    """A run's options as a dict (a TrainConfig, or another dataclass of options such as
    :class:`stellarlm.finetune.FinetuneConfig`)."""
    d = asdict(cfg)
    if hasattr(cfg, "model"):
        d["model"] = cfg.model.to_dict()
    return d
