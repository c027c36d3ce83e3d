"""Checkpoints: a run stopped after any epoch and resumed from disk ends exactly like one that never stopped."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from models import checkpoint as ckpt_module
from models.checkpoint import STATE_FILE, CheckpointError, TrainState, has_state, load_state, resume_problem, save_state
from models.data import ImageArray
from models.errors import DiskFullError, is_disk_full
from models.results import TrainResult
from models.training import TrainHooks, train


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in ``train`` catches it."""


def _run_until(data: ImageArray, spec, directory: Path, member: int, epoch: int) -> None:
    """Train with checkpoints and stop dead right after the checkpoint of ``(member, epoch)``."""

    def checkpoint(state: TrainState) -> None:
        save_state(state, directory)
        if (state.member, state.epoch) == (member, epoch):
            raise Killed

    with pytest.raises(Killed):
        train(data, spec, device="cpu", hooks=TrainHooks(checkpoint=checkpoint))


def _epochs(result: TrainResult) -> list[tuple]:
    # Everything but wall times.
    return [(r.member, r.epoch, r.train_loss, r.train_acc, r.val_loss, r.val_acc, r.lr, r.extra.get("best"))
            for r in result.history]


def _assert_same_run(a: TrainResult, b: TrainResult) -> None:
    assert _epochs(a) == _epochs(b)
    assert (a.val_acc, a.val_loss, a.member_val_acc) == (b.val_acc, b.val_loss, b.member_val_acc)
    for ma, mb in zip(a.members, b.members, strict=True):
        assert (ma.best_epoch, ma.epochs_run, ma.val_acc, ma.val_loss) == (mb.best_epoch, mb.epochs_run, mb.val_acc,
                                                                          mb.val_loss)
        assert ma.state_dict.keys() == mb.state_dict.keys()
        for k, v in ma.state_dict.items():
            assert torch.equal(v, mb.state_dict[k]), k


@pytest.fixture(scope="module")
def small(lfw_data: ImageArray) -> ImageArray:
    """40 faces and 40 non-faces: exactness does not need more, and each epoch is quicker."""
    keep = np.r_[0:40, 100:140]
    return ImageArray(lfw_data.images[keep], lfw_data.labels[keep], list(lfw_data.classes))


@pytest.fixture(scope="module")
def spec(tiny_spec):
    # Augmentation, head dropout and shuffling all draw random numbers. With patience 2 the first
    # member stops early after its third epoch here (its val loss rises, then dips below the best
    # only at epoch 4), so a resume must carry the early-stopping counter over too.
    return tiny_spec(epochs=4, ensemble={"members": 2}, head_dropout=0.3, patience=2)


@pytest.fixture(scope="module")
def straight(small: ImageArray, spec) -> TrainResult:
    return train(small, spec, device="cpu")


@pytest.mark.parametrize(
    ("member", "epoch"),
    # Every run has these epochs: patience 2 cannot stop a member before its third epoch.
    [(0, 1), (0, 2), (1, 1)],
    ids=["mid-member", "member-boundary", "second-member"],
)
def test_resumed_run_equals_uninterrupted_run(small, spec, straight, tmp_path, member, epoch) -> None:
    _run_until(small, spec, tmp_path, member, epoch)
    state = load_state(tmp_path)
    done = [(r.member, r.epoch) for r in straight.history]
    last_epoch_of_member = max(e for m, e in done if m == member)
    assert (state.member, state.epoch, state.member_done) == (member, epoch, epoch == last_epoch_of_member)
    assert len(state.finished) == member and len(state.history) == done.index((member, epoch)) + 1
    assert resume_problem(state, small, spec) is None

    lines: list[str] = []
    seen: list = []
    resumed = train(small, spec, device="cpu", resume=state, hooks=TrainHooks(on_epoch=seen.append, log=lines.append))

    assert any("resumed after epoch" in line for line in lines)
    assert [(r.member, r.epoch) for r in seen] == done[len(state.history):]
    _assert_same_run(resumed, straight)


def test_state_round_trips_through_safetensors_only(small, tiny_spec, tmp_path) -> None:
    spec = tiny_spec(epochs=2, optimizer={"name": "adam", "lr": 1e-3})
    states: list[TrainState] = []
    train(small, spec, device="cpu", hooks=TrainHooks(checkpoint=lambda s: (save_state(s, tmp_path), states.append(s))))
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary file left behind
    # It is a plain safetensors file: every tensor readable without running any code.
    with safetensors.safe_open(str(tmp_path / STATE_FILE), framework="pt") as f:
        assert f.metadata()["format"] == "zoofit-train-state"
        assert any(k.startswith("s.model.") for k in f.keys())

    saved, loaded = states[-1], load_state(tmp_path)
    assert (loaded.member, loaded.epoch, loaded.member_done) == (0, 1, True)
    assert loaded.history == saved.history and loaded.fingerprint == saved.fingerprint
    for k, v in saved.model.items():
        assert torch.equal(loaded.model[k], v.cpu())
    opt = loaded.optimizer
    assert set(opt["state"]) == set(saved.optimizer["state"]) and all(isinstance(k, int) for k in opt["state"])
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert loaded.scheduler == saved.scheduler
    assert torch.equal(loaded.rng["torch"], saved.rng["torch"])
    assert loaded.rng["python"] == saved.rng["python"] and loaded.rng["batches"] == saved.rng["batches"]
    assert (loaded.train_idx == saved.train_idx).all() and (loaded.best_probs == saved.best_probs).all()

    # Killed after the very last checkpoint: resuming trains nothing and still returns the model.
    seen: list = []
    result = train(small, spec, device="cpu", resume=loaded, hooks=TrainHooks(on_epoch=seen.append))
    assert seen == [] and result.history == loaded.history
    assert all(torch.equal(v, loaded.best_state[k]) for k, v in result.members[0].state_dict.items())
    assert result.members[0].best_epoch == loaded.best_epoch and result.val_acc == loaded.best_acc


@pytest.fixture
def saved(small, tiny_spec, tmp_path) -> tuple[Path, TrainState]:
    """A checkpoint after epoch 1 of a 2-epoch run, and its state."""
    spec = tiny_spec(epochs=2)
    _run_until(small, spec, tmp_path, 0, 0)
    return tmp_path, load_state(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign"])
def test_damaged_checkpoint_is_refused(saved, damage) -> None:
    directory, _ = saved
    path = directory / STATE_FILE
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01 not a checkpoint" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        safetensors.torch.save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "something-else"})
    assert has_state(directory)
    with pytest.raises(CheckpointError, match="checkpoint"):
        load_state(directory)
    with pytest.raises(CheckpointError):
        load_state(directory / "missing")


def test_checkpoint_of_another_run_is_ignored(small, tiny_spec, saved) -> None:
    _, state = saved
    other = tiny_spec(epochs=2, optimizer={"name": "adamw", "lr": 1e-2})
    assert "recipe" in (resume_problem(state, small, other) or "")
    fewer = ImageArray(small.images[:-2], small.labels[:-2], list(small.classes))
    assert "images" in (resume_problem(state, fewer, tiny_spec(epochs=2)) or "")

    lines: list[str] = []
    result = train(small, other, device="cpu", resume=state, hooks=TrainHooks(log=lines.append))
    assert any("not resuming" in line and "recipe" in line for line in lines)
    assert [(r.member, r.epoch) for r in result.history] == [(0, 0), (0, 1)]  # trained from the start
    _assert_same_run(result, train(small, other, device="cpu"))


def test_interrupted_write_keeps_the_previous_checkpoint(saved, monkeypatch) -> None:
    directory, state = saved
    before = (directory / STATE_FILE).read_bytes()

    def killed_mid_write(tensors, path, metadata):
        Path(path).write_bytes(b"half a checkpoint")
        raise Killed

    monkeypatch.setattr(ckpt_module, "_write", killed_mid_write)
    with pytest.raises(Killed):
        save_state(state, directory)
    assert (directory / STATE_FILE).read_bytes() == before
    assert load_state(directory).epoch == state.epoch

    # A real kill leaves the temporary file behind: it is never read, and the next write removes it.
    (directory / f".{STATE_FILE}.abc.tmp").write_bytes(b"half a checkpoint")
    assert load_state(directory).epoch == state.epoch
    monkeypatch.undo()
    save_state(state, directory)
    assert [p.name for p in directory.iterdir()] == [STATE_FILE]


def test_full_disk_raises_disk_full_and_keeps_the_previous_checkpoint(saved, monkeypatch) -> None:
    directory, state = saved
    before = (directory / STATE_FILE).read_bytes()

    def no_space(tensors, path, metadata):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module, "_write", no_space)
    with pytest.raises(DiskFullError, match="disk full while writing the training checkpoint"):
        save_state(state, directory)
    assert (directory / STATE_FILE).read_bytes() == before
    assert [p.name for p in directory.iterdir()] == [STATE_FILE]


def test_is_disk_full_recognises_safetensors_and_chained_errors() -> None:
    # What safetensors really raises when the disk fills up (its Rust writer keeps only the message).
    st_error = safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert is_disk_full(st_error)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(safetensors.SafetensorError("Error while serializing: something else"))


RICH = {
    # cached augmented views, EMA served when better, the plateau schedule's state, discriminative lr
    "cache-ema-plateau": {
        "epochs": 3, "ensemble": {"members": 2, "ema": True, "ema_decay": 0.9}, "cache": {"views": 2},
        "freeze": {"mode": "first_n", "stages": 3, "backbone_lr_mult": 0.5},
        "schedule": {"name": "plateau", "warmup_epochs": 0, "plateau_patience": 0},
    },
    # pretrained members sharing one cache of augmented views: a resumed third member draws the same
    "shared-augmented-views": {
        "backbone": "tf_efficientnet_lite0", "weights": "bundled", "epochs": 2, "ensemble": {"members": 3},
        "cache": {"views": 2}, "augment": {"preset": "light"}, "freeze": {"mode": "first_n", "stages": 4},
    },
    # one cyclic run whose snapshots are the members, while groups unfreeze
    "snapshot-gradual": {
        "epochs": 4, "ensemble": {"members": 2, "snapshot": True},
        "freeze": {"mode": "gradual", "stages": 2, "unfreeze_every": 1},
    },
}


@pytest.mark.parametrize("name", list(RICH))
def test_resume_is_exact_with_every_stateful_technique(small, tiny_spec, tmp_path, name) -> None:
    rich = tiny_spec(**RICH[name])
    straight = train(small, rich, device="cpu")
    member, epoch = {"cache-ema-plateau": (1, 0), "shared-augmented-views": (2, 0)}.get(name, (0, 2))
    _run_until(small, rich, tmp_path, member, epoch)
    state = load_state(tmp_path)
    assert resume_problem(state, small, rich) is None
    if name == "snapshot-gradual":
        assert len(state.finished) == 1  # the first cycle's snapshot is kept in the checkpoint
    elif name == "shared-augmented-views":
        assert len(state.finished) == 2  # the cache of members 1-2 is gone: the resumed run builds it again
    else:
        assert state.ema is not None
    resumed = train(small, rich, device="cpu", resume=state)
    _assert_same_run(resumed, straight)
    assert [m.served for m in resumed.members] == [m.served for m in straight.members]


@pytest.mark.parametrize(("member", "epoch"), [(0, 0), (0, 2)], ids=["mid-member", "member-boundary"])
def test_a_resumed_pretrained_member_caches_its_pretrained_prefix(small, tiny_spec, tmp_path, member, epoch) -> None:
    # The frozen prefix's features must come from the checkpoint's (pretrained) weights, not from the
    # architecture built empty to receive them: the cache is built before training resumes.
    spec = tiny_spec(backbone="tf_efficientnet_lite0", weights="bundled", freeze={"mode": "first_n", "stages": 4},
                     augment={"preset": "none"}, head_dropout=0.0, epochs=3, ensemble={"members": 2})
    straight = train(small, spec, device="cpu")
    _run_until(small, spec, tmp_path, member, epoch)
    resumed = train(small, spec, device="cpu", resume=load_state(tmp_path))
    _assert_same_run(resumed, straight)


def test_a_shortened_member_resumes_with_its_own_epochs(small, spec, tmp_path, monkeypatch) -> None:
    # A time budget trained the second member on a shorter schedule (2 of the recipe's 4 epochs); a worker
    # killed after its first epoch must go on with 2, not the recipe's 4 (the schedule and loop follow them).
    from models.training import _Run

    recipe = spec.model_copy(update={"patience": None})
    monkeypatch.setattr(_Run, "epochs_that_fit", lambda run, i: 2 if i == 1 else run.recipe_epochs)
    straight = train(small, recipe, device="cpu")
    assert [m.epochs_run for m in straight.members] == [4, 2]
    _run_until(small, recipe, tmp_path, 1, 0)
    state = load_state(tmp_path)
    assert (state.member, state.epoch, state.member_epochs) == (1, 0, 2)
    assert resume_problem(state, small, recipe) is None
    resumed = train(small, recipe, device="cpu", resume=state)
    _assert_same_run(resumed, straight)
    # a checkpoint whose member's epochs are not the recipe's (over them, or already past) is refused
    for bad in (5, 0):
        state.member_epochs = bad
        assert "outside the recipe" in (resume_problem(state, small, recipe) or "")
