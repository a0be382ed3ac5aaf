"""Checkpoints as a whole: atomic saves, a kill at any phase, checksums, resume guards, options."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import stellarlm.training as training
from stellarlm import ConfigError, DataFileError, Vocabulary
from stellarlm.model import ModelConfig, StellarTransformer
from stellarlm.training import TrainConfig, latest_checkpoint, load_model, save_model, train

from conftest import TINY, _slice

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"
PHASES = ["weights", "meta", "state", "checksums", "rename", "pointer", "cleanup"]


class Killed(BaseException):
    """What a SIGKILL does to a save: nothing after it runs (BaseException: no handler catches it)."""


def _cfg(out, **kw):
    return TrainConfig(**{**dict(out_dir=str(out), steps=12, batch_size=16, warmup_steps=3, checkpoint_every=4,
                                 eval_every=3, model=ModelConfig(**TINY), seed=7), **kw})


@pytest.fixture(scope="module")
def small(small_embedded):
    return _slice(small_embedded).subset(slice(0, 600))


@pytest.fixture(scope="module")
def straight(small, tmp_path_factory):
    """An uninterrupted tiny run: its final weights and its log."""
    out = tmp_path_factory.mktemp("straight")
    train(small, _cfg(out), progress=False)
    return load_model(out)[0].state_dict(), _log(out)


def _log(out):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("phase", PHASES)
def test_a_kill_at_any_phase_of_a_save_resumes_bit_identically(small, straight, tmp_path, monkeypatch, phase):
    seen = []

    def die(name):
        seen.append(name)
        if name == phase and seen.count(name) == 2:  # during the second checkpoint (step 8)
            raise Killed(name)

    monkeypatch.setattr(training.checkpoint, "_phase", die)
    with pytest.raises(Killed):
        train(small, _cfg(tmp_path), progress=False)
    monkeypatch.setattr(training.checkpoint, "_phase", lambda name: None)
    before = latest_checkpoint(tmp_path)
    assert before is not None and (before / "checksums.json").exists()
    train(small, _cfg(tmp_path), progress=False, resume=True)
    _assert_same_weights(straight[0], load_model(tmp_path)[0].state_dict())
    assert _log(tmp_path) == straight[1]  # each step logged once, as in the uninterrupted run
    assert [p.name for p in (tmp_path / "checkpoint").iterdir() if p.is_dir()] == ["step-000012"]


def test_damaged_checkpoint_files_are_refused_by_name(small, tmp_path):
    train(small, _cfg(tmp_path), progress=False, stop_at=4)
    ckpt = latest_checkpoint(tmp_path)
    for name in ("model.safetensors", "model.json", "train_state.pt"):
        copy = tmp_path / f"copy_{name}"
        shutil.copytree(tmp_path, copy, ignore=shutil.ignore_patterns("copy_*"))
        target = latest_checkpoint(copy) / name
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit flipped
        target.write_bytes(bytes(data))
        with pytest.raises(DataFileError, match=name.replace(".", r"\.")):
            train(small, _cfg(copy), progress=False, resume=True)
    (ckpt.parent / "latest").write_text("../../etc\n")
    with pytest.raises(DataFileError, match="latest"):
        train(small, _cfg(tmp_path), progress=False, resume=True)


def test_a_bit_flipped_final_model_is_refused(tmp_path):
    vocab = Vocabulary.default()
    save_model(tmp_path, StellarTransformer(ModelConfig(n_vocab=len(vocab), **TINY)), vocab, {})
    load_model(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # in a tensor's bytes: still parses as safetensors
    weights.write_bytes(bytes(data))
    with pytest.raises(DataFileError, match="model.safetensors"):
        load_model(tmp_path)


def test_a_model_json_with_another_vocabulary_is_refused(tmp_path):
    vocab = Vocabulary.default()
    save_model(tmp_path, StellarTransformer(ModelConfig(n_vocab=len(vocab), **TINY)), vocab, {})
    (tmp_path / "checksums.json").unlink()  # the fingerprint in the weights alone must catch it
    meta = json.loads((tmp_path / "model.json").read_text())
    swap = {"teff": "logg", "logg": "teff"}
    for t in meta["vocabulary"]["tokens"]:
        t["name"] = swap.get(t["name"], t["name"])
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DataFileError, match="model.json"):
        load_model(tmp_path)


def test_plain_model_directories_without_checksums_still_load(tmp_path):
    for name in ("model.json", "model.safetensors"):  # a model directory written before checksums existed
        shutil.copy(DEFAULT_MODEL / name, tmp_path / name)
    model, vocab, meta = load_model(tmp_path)
    assert len(vocab) == model.cfg.n_vocab


@pytest.mark.parametrize("change", [dict(lr=1e-3), dict(max_targets=8)])
def test_resume_with_changed_options_is_refused_unless_allowed(small, tmp_path, change):
    train(small, _cfg(tmp_path), progress=False, stop_at=4)
    with pytest.raises(ConfigError, match="--" + next(iter(change)).replace("_", "-")):
        train(small, _cfg(tmp_path, **change), progress=False, resume=True)
    train(small, _cfg(tmp_path, **change), progress=False, resume=True, allow_config_change=True)


def test_resume_on_other_data_is_refused(small, tmp_path):
    train(small, _cfg(tmp_path), progress=False, stop_at=4)
    with pytest.raises(ConfigError, match="other training data"):
        train(small.subset(slice(0, 500)), _cfg(tmp_path), progress=False, resume=True)


def test_two_trainings_cannot_share_an_output_directory(small, tmp_path):
    with training._run_lock(tmp_path):
        with pytest.raises(ConfigError, match="another training"):
            train(small, _cfg(tmp_path), progress=False)
    train(small, _cfg(tmp_path), progress=False, stop_at=1)  # released afterwards


BAD_OPTIONS = [dict(steps=-5), dict(steps=0), dict(batch_size=0), dict(p_group=1.5), dict(eval_every=-1),
               dict(checkpoint_every=0), dict(lr=float("nan")), dict(lr=-1.0), dict(patch_size=0), dict(p_xp=2.0),
               dict(workers=0), dict(device="cuda:7"), dict(device="gpu"), dict(max_minutes=0.0)]


@pytest.mark.parametrize("bad", BAD_OPTIONS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_bad_training_options_are_named_before_any_work(tmp_path, bad):
    cfg = _cfg(tmp_path / "out", **bad)
    with pytest.raises(ConfigError, match="--" + next(iter(bad)).replace("_", "-")):
        train(None, cfg, progress=False)  # no table: the check comes before anything touches it
    assert not (tmp_path / "out").exists()


def test_bad_model_options_are_named(tmp_path):
    with pytest.raises(ConfigError, match="--n-heads"):
        train(None, TrainConfig(out_dir=str(tmp_path), model=ModelConfig(d_model=32, n_heads=3)), progress=False)
    with pytest.raises(ConfigError, match="--d-model"):
        train(None, TrainConfig(out_dir=str(tmp_path), model=ModelConfig(d_model=0)), progress=False)
