"""Run-folder storage: deterministic safetensors bytes, checkpoint manifests, falling back to the
newest intact checkpoint, failed writes that change nothing, stale temporaries."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import difforge.runs.storage as storage
from difforge.errors import DifforgeError
from difforge.nn import UNetConfig
from difforge.process import process_config_from_dict
from difforge.runs.config import CONFIG_FILE, DataInfo, RunConfig, TrainConfig
from difforge.runs.models import build_model, find_weights, load_model
from difforge.runs.storage import (
    CHECKPOINT_FILES,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    WEIGHTS_RECORD,
    check_checkpoint,
    checkpoint_dirs,
    intact_checkpoints,
    load_tensors,
    newest_intact_checkpoint,
    remove_stale_temporaries,
    resolve_run_path,
    safetensors_bytes,
    save_tensors_atomic,
    verify_checkpoint,
    verify_weights_file,
    write_bytes_atomic,
    write_checkpoint,
)

METADATA = {f"key_{i:02d}": f"value {i}" for i in range(16)}


def _one_line_error(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(excinfo.value)
    assert excinfo.type is DifforgeError and "\n" not in message, message
    return message


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(4, 3, generator=generator),
        "bias": torch.randn(4, generator=generator).double(),
        "count": torch.arange(seed, seed + 5),
        "flag": torch.tensor([True, False]),
    }


def _files(seed: int) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    return {
        name: (_tensors(seed * 10 + index), {"format": "pt", "step": str(seed), **METADATA})
        for index, name in enumerate(CHECKPOINT_FILES)
    }


def _run(tmp_path: Path, steps: tuple[int, ...] = (1, 2), keep: int = 10) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / CONFIG_FILE).write_text("{}")
    for step in steps:
        write_checkpoint(run, step, _files(step), keep)
    return run


def _flip_data_bit(path: Path, from_end: int = 1) -> None:
    """Flip one bit in the tensor data of a safetensors file (the header still parses)."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    assert len(data) - from_end >= 8 + header
    data[-from_end] ^= 0x10
    path.write_bytes(bytes(data))


def _snapshot(run: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(run)): path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()
    }


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- deterministic bytes ---------------------------------------------------------------------


def test_the_same_state_gives_the_same_bytes(tmp_path: Path) -> None:
    tensors = _tensors(0)
    save_tensors_atomic(tmp_path / "a.safetensors", tensors, METADATA)
    save_tensors_atomic(
        tmp_path / "b.safetensors", {k: v.clone() for k, v in tensors.items()}, dict(METADATA)
    )
    first, second = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert first == second
    assert len({safetensors_bytes(tensors, METADATA) for _ in range(10)}) == 1
    assert _equal(load_file(str(tmp_path / "a.safetensors")), tensors)
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as handle:
        assert handle.metadata() == METADATA


def test_the_deterministic_header_follows_the_format() -> None:
    data = safetensors_bytes(_tensors(1), METADATA)
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length]
    assert (8 + length) % 8 == 0 and header.startswith(b"{")
    parsed = json.loads(header)
    assert list(parsed) == sorted(parsed) and list(parsed["__metadata__"]) == sorted(METADATA)
    assert max(
        end for _, end in (entry["data_offsets"] for k, entry in parsed.items() if k != "__metadata__")
    ) == (len(data) - 8 - length)
    assert safetensors_bytes({"x": torch.zeros(3)}) == safetensors_bytes({"x": torch.zeros(3)}, {})


# ---- manifests ---------------------------------------------------------------------------------


def test_every_checkpoint_has_a_manifest_of_its_files(tmp_path: Path) -> None:
    run = _run(tmp_path, steps=(3,))
    folder = checkpoint_dirs(run)[-1]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["format"] == MANIFEST_FORMAT and manifest["step"] == 3
    assert sorted(manifest["files"]) == sorted(CHECKPOINT_FILES)
    for name, entry in manifest["files"].items():
        content = (folder / name).read_bytes()
        assert entry == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    verify_checkpoint(folder)
    assert check_checkpoint(folder) is None
    record = json.loads((run / WEIGHTS_RECORD).read_text())
    for name in ("model.safetensors", "ema.safetensors"):
        assert (run / name).read_bytes() == (folder / name).read_bytes()
        assert record["files"][name]["sha256"] == manifest["files"][name]["sha256"]
        assert verify_weights_file(run, name) is None


def test_the_manifest_is_written_last_and_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    run = _run(tmp_path, steps=())
    real_save, real_replace = storage.save_file, os.replace
    renamed = []

    def watching_save(tensors, path, metadata=None):  # noqa: ANN001 - mirrors safetensors' signature
        assert not (Path(path).parent / MANIFEST_FILE).exists()
        return real_save(tensors, path, metadata=metadata)

    def watching_replace(source, target) -> None:  # noqa: ANN001
        if Path(target).name == "step_00000005":
            manifest = json.loads((Path(source) / MANIFEST_FILE).read_text())
            assert sorted(manifest["files"]) == sorted(CHECKPOINT_FILES)
            renamed.append(target)
        real_replace(source, target)

    monkeypatch.setattr(storage, "save_file", watching_save)
    monkeypatch.setattr(os, "replace", watching_replace)
    write_checkpoint(run, 5, _files(5), keep=2)
    assert len(renamed) == 1


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: (f / MANIFEST_FILE).unlink(), "manifest.json is missing"),
        (lambda f: (f / MANIFEST_FILE).write_text("{not json"), "manifest.json is damaged"),
        (lambda f: (f / MANIFEST_FILE).write_text('{"format": "other"}'), "has format 'other'"),
        (lambda f: (f / "ema.safetensors").unlink(), "ema.safetensors is missing"),
        (lambda f: (f / "ema.safetensors").write_bytes(b"short"), "has 5 bytes"),
        (lambda f: _flip_data_bit(f / "ema.safetensors"), "does not match its SHA-256"),
    ],
)
def test_verify_checkpoint_names_the_first_problem(
    tmp_path: Path, damage: Callable[[Path], None], expected: str
) -> None:
    folder = checkpoint_dirs(_run(tmp_path, steps=(1,)))[-1]
    damage(folder)
    with pytest.raises(DifforgeError) as excinfo:
        verify_checkpoint(folder)
    assert expected in _one_line_error(excinfo)


def test_verify_checkpoint_of_a_file_the_manifest_does_not_list(tmp_path: Path) -> None:
    folder = checkpoint_dirs(_run(tmp_path, steps=(1,)))[-1]
    with pytest.raises(DifforgeError, match="not listed"):
        verify_checkpoint(folder, ["extra.safetensors"])
    verify_checkpoint(folder, ["ema.safetensors"])


# ---- falling back to the newest intact checkpoint ----------------------------------------------


def _old_style_checkpoint(run: Path, step: int) -> Path:
    """A checkpoint as difforge wrote it before manifests: the files, nothing else."""
    folder = run / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    for name, (tensors, metadata) in _files(step).items():
        save_tensors_atomic(folder / name, tensors, metadata)
    return folder


def test_damaged_empty_and_incomplete_checkpoints_are_skipped(tmp_path: Path) -> None:
    run = _run(tmp_path, steps=(1, 2, 3, 4))
    folders = checkpoint_dirs(run)
    _flip_data_bit(folders[3] / "model.safetensors")
    (folders[2] / "trainer.safetensors").unlink()
    empty = run / "checkpoints" / "step_00000009"
    empty.mkdir()
    intact, skipped = intact_checkpoints(run)
    assert intact == folders[:2]
    reasons = dict(skipped)
    assert list(reasons) == [folders[2], folders[3], empty]
    assert "trainer.safetensors is missing" in reasons[folders[2]]
    assert "SHA-256" in reasons[folders[3]]
    assert "empty" in reasons[empty]
    assert all("\n" not in reason for reason in reasons.values())
    newest, newer = newest_intact_checkpoint(run)
    assert newest == folders[1] and [folder for folder, _ in newer] == [empty, folders[3], folders[2]]
    assert newest_intact_checkpoint(run, ["model.safetensors"])[0] == folders[2]


def test_checkpoints_without_a_manifest_are_accepted_unverified(tmp_path: Path) -> None:
    run = _run(tmp_path, steps=())
    old = _old_style_checkpoint(run, 1)
    truncated = _old_style_checkpoint(run, 2)
    data = (truncated / "ema.safetensors").read_bytes()
    (truncated / "ema.safetensors").write_bytes(data[:-3])
    incomplete = _old_style_checkpoint(run, 3)
    (incomplete / "model.safetensors").unlink()
    scan = intact_checkpoints(run)
    intact, skipped = scan
    assert intact == [old] and [folder for folder, _ in skipped] == [truncated, incomplete]
    assert [folder for folder, _ in scan.unverified] == [old] and "unverified" in scan.unverified[0][1]
    assert "damaged" in dict(skipped)[truncated] and "missing" in dict(skipped)[incomplete]
    with pytest.raises(DifforgeError, match="manifest.json is missing"):
        verify_checkpoint(old)


# ---- weights for sampling --------------------------------------------------------------------


def _model_run(tmp_path: Path, steps: tuple[int, ...] = (1, 2)) -> tuple[Path, RunConfig, dict[int, dict]]:
    config = RunConfig(
        UNetConfig.preset("tiny", image_size=8, in_channels=1),
        process_config_from_dict({}),
        TrainConfig(),
        DataInfo(),
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(config.to_json())
    torch.manual_seed(0)
    model = build_model(config)
    states = {}
    for step in steps:
        state = {k: v + step for k, v in model.state_dict().items()}
        states[step] = state
        meta = {"format": "pt", "step": str(step)}
        files = {"model.safetensors": (state, meta), "ema.safetensors": (state, meta)}
        files["trainer.safetensors"] = ({"x": torch.zeros(1)}, {})
        write_checkpoint(run, step, files, keep=3)
    return run, config, states


def test_resolve_run_path(tmp_path: Path) -> None:
    run = _run(tmp_path, steps=(1,))
    step = checkpoint_dirs(run)[0]
    assert resolve_run_path(run) == (run, run)
    assert resolve_run_path(str(step)) == (run, step)
    problems = {
        tmp_path / "nowhere": "does not exist",
        run / "ema.safetensors": "is a file",
        run / "checkpoints": "neither a run folder",
    }
    orphan = tmp_path / "loose" / "checkpoints" / "step_00000001"
    orphan.mkdir(parents=True)
    problems[orphan] = "config.json is missing"
    staging = run / "checkpoints" / ".tmp-step_00000002-123"
    staging.mkdir()
    problems[staging] = "unfinished checkpoint"
    for path, expected in problems.items():
        with pytest.raises(DifforgeError) as excinfo:
            resolve_run_path(path)
        assert expected in _one_line_error(excinfo), path


def test_load_model_from_a_checkpoint_folder_verifies_it(tmp_path: Path) -> None:
    run, config, states = _model_run(tmp_path)
    first = checkpoint_dirs(run)[0]
    model = load_model(first, config, "raw")
    assert _equal(model.state_dict(), states[1])
    _flip_data_bit(first / "ema.safetensors", from_end=7)
    with pytest.raises(DifforgeError) as excinfo:
        load_model(first, config)
    assert "ema.safetensors does not match its SHA-256" in _one_line_error(excinfo)


def test_load_model_falls_back_when_the_top_level_file_is_missing(tmp_path: Path) -> None:
    run, config, states = _model_run(tmp_path)
    (run / "ema.safetensors").unlink()
    notes: list[str] = []
    model = load_model(run, config, "ema", report=notes.append)
    assert _equal(model.state_dict(), states[2])
    assert len(notes) == 1 and "ema.safetensors is missing" in notes[0]
    assert str(checkpoint_dirs(run)[-1] / "ema.safetensors") in notes[0]


def test_a_bit_flipped_top_level_file_does_not_load_silently(tmp_path: Path, capsys) -> None:
    run, config, states = _model_run(tmp_path)
    _flip_data_bit(run / "ema.safetensors", from_end=5)
    assert load_tensors(run / "ema.safetensors")  # still opens: only the hash can tell
    model = load_model(run, config)
    assert _equal(model.state_dict(), states[2])
    note = capsys.readouterr().err
    assert "note:" in note and "SHA-256" in note and "step_00000002" in note
    _flip_data_bit(checkpoint_dirs(run)[-1] / "ema.safetensors", from_end=5)
    choice = find_weights(run, "ema")
    assert choice.path == checkpoint_dirs(run)[0] / "ema.safetensors" and _equal(choice.state, states[1])


def test_nothing_intact_is_one_line_error(tmp_path: Path) -> None:
    run, config, _ = _model_run(tmp_path)
    for folder in checkpoint_dirs(run):
        (folder / "model.safetensors").write_bytes(b"garbage")
    (run / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DifforgeError) as excinfo:
        load_model(run, config, "raw")
    message = _one_line_error(excinfo)
    assert "model.safetensors" in message and "step_00000001" in message and "step_00000002" in message


def test_runs_of_older_difforge_still_load(tmp_path: Path) -> None:
    run, config, states = _model_run(tmp_path, steps=(1,))
    for folder in checkpoint_dirs(run):
        (folder / MANIFEST_FILE).unlink()
    (run / WEIGHTS_RECORD).unlink()
    notes: list[str] = []
    assert _equal(load_model(run, config, report=notes.append).state_dict(), states[1])
    assert notes == []
    assert "unverified" in (verify_weights_file(run, "ema.safetensors") or "")
    (run / "ema.safetensors").unlink()
    assert _equal(load_model(run, config, report=notes.append).state_dict(), states[1])
    assert "unverified" in notes[0]


# ---- failed writes -----------------------------------------------------------------------------


def _temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if p.name.startswith(".") and ".tmp-" in p.name]


def _full_disk_save(after: int) -> Callable:
    real_save = storage.save_file
    calls = {"n": 0}

    def save(tensors, path, metadata=None):  # noqa: ANN001 - mirrors safetensors' signature
        calls["n"] += 1
        if calls["n"] > after:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    return save


def test_a_full_disk_while_writing_a_checkpoint_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    run = _run(tmp_path, steps=(1, 2), keep=2)
    before = _snapshot(run)
    monkeypatch.setattr(storage, "save_file", _full_disk_save(after=1))
    with pytest.raises(DifforgeError) as excinfo:
        write_checkpoint(run, 3, _files(3), keep=2)
    message = _one_line_error(excinfo)
    assert message.startswith("no space left on device while writing checkpoint step_00000003")
    assert "the previous checkpoint step_00000002 is intact" in message
    assert _snapshot(run) == before and not _temporaries(run)
    assert intact_checkpoints(run)[0] == checkpoint_dirs(run)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000001", "step_00000002"]


class _FullDiskFile:
    """A file whose writes fail with ENOSPC after a few bytes."""

    def __init__(self, path: str, mode: str) -> None:
        self.handle = builtins.open(path, mode)  # noqa: SIM115 - closed by __exit__

    def write(self, data: bytes) -> int:
        self.handle.write(bytes(data[:3]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self.handle, name)


def _full_disk_for(monkeypatch, predicate: Callable[[Path], bool]) -> None:
    def fake_open(path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if "w" in mode and predicate(Path(path)):
            return _FullDiskFile(path, mode)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(storage, "open", fake_open, raising=False)


@pytest.mark.parametrize(
    "target",
    [
        lambda p: p.name == MANIFEST_FILE,  # the last file of the folder
        lambda p: p.name.startswith(".ema.safetensors.tmp-"),  # the top-level copy
        lambda p: p.name.startswith(f".{WEIGHTS_RECORD}.tmp-"),
    ],
)
def test_a_full_disk_at_any_later_file_changes_nothing(tmp_path: Path, monkeypatch, target) -> None:  # noqa: ANN001
    run = _run(tmp_path, steps=(1, 2), keep=2)
    before = _snapshot(run)
    _full_disk_for(monkeypatch, target)
    with pytest.raises(
        DifforgeError, match="^no space left on device while writing checkpoint step_00000003"
    ):
        write_checkpoint(run, 3, _files(3), keep=2)
    assert _snapshot(run) == before and not _temporaries(run)


def test_a_failed_rename_rolls_back_and_the_weights_stay_consistent(tmp_path: Path, monkeypatch) -> None:
    run, config, states = _model_run(tmp_path)
    real_replace = os.replace

    def failing_replace(source, target) -> None:  # noqa: ANN001
        if Path(target).name == "ema.safetensors":  # after model.safetensors was replaced
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    files = {
        "model.safetensors": (states[2], {}),
        "ema.safetensors": (states[2], {}),
        "trainer.safetensors": ({"x": torch.ones(1)}, {}),
    }
    files = {name: ({k: v * 2 for k, v in tensors.items()}, meta) for name, (tensors, meta) in files.items()}
    with pytest.raises(DifforgeError) as excinfo:
        write_checkpoint(run, 3, files, keep=3)
    monkeypatch.setattr(os, "replace", real_replace)
    message = _one_line_error(excinfo)
    assert message.startswith("input/output error while writing checkpoint step_00000003")
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000001", "step_00000002"] and not _temporaries(
        run
    )
    notes: list[str] = []
    assert _equal(load_model(run, config, "raw", report=notes.append).state_dict(), states[2])
    assert len(notes) == 1 and "step_00000002" in notes[0]  # the half-updated top-level file is not used
    assert _equal(load_model(run, config, "ema", report=notes.append).state_dict(), states[2])


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.EACCES, "Permission denied"), "permission denied while writing checkpoint"),
        (SafetensorError("bad tensor"), "a safetensors error (bad tensor) while writing checkpoint"),
    ],
)
def test_other_write_errors_are_one_line(
    tmp_path: Path, monkeypatch, error: Exception, expected: str
) -> None:
    run = _run(tmp_path, steps=(1,))

    def failing_save(tensors, path, metadata=None):  # noqa: ANN001
        raise error

    monkeypatch.setattr(storage, "save_file", failing_save)
    with pytest.raises(DifforgeError) as excinfo:
        write_checkpoint(run, 2, _files(2), keep=3)
    assert _one_line_error(excinfo).startswith(expected)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000001"] and not _temporaries(run)


def test_an_interrupt_while_writing_removes_the_staging_folder(tmp_path: Path, monkeypatch) -> None:
    run = _run(tmp_path, steps=(1,))
    before = _snapshot(run)

    def interrupted(tensors, path, metadata=None):  # noqa: ANN001
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(run, 2, _files(2), keep=1)
    assert _snapshot(run) == before and not _temporaries(run)


def test_rewriting_a_step_replaces_it_and_a_failed_rewrite_keeps_it(tmp_path: Path, monkeypatch) -> None:
    run = _run(tmp_path, steps=(1, 2))
    write_checkpoint(run, 2, _files(7), keep=3)
    folder = checkpoint_dirs(run)[-1]
    assert _equal(load_tensors(folder / "model.safetensors"), _files(7)["model.safetensors"][0])
    verify_checkpoint(folder)
    before = _snapshot(run)
    monkeypatch.setattr(storage, "save_file", _full_disk_save(after=2))
    with pytest.raises(DifforgeError, match="the previous checkpoint step_00000002 is intact"):
        write_checkpoint(run, 2, _files(8), keep=3)
    assert _snapshot(run) == before and not _temporaries(run)


def test_keep_counts_checkpoints_and_never_prunes_the_new_one(tmp_path: Path) -> None:
    run = _run(tmp_path, steps=(1, 2, 3, 4, 5), keep=2)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000004", "step_00000005"]
    write_checkpoint(run, 3, _files(3), keep=1)  # resumed from an older checkpoint
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000003"] and not _temporaries(run)
    _run(tmp_path / "all", steps=(1, 2, 3), keep=0)
    assert len(checkpoint_dirs(tmp_path / "all" / "run")) == 3


def test_atomic_writers_remove_their_temporary_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "config.json"
    write_bytes_atomic(target, b"old")
    weights = tmp_path / "w.safetensors"
    save_tensors_atomic(weights, _tensors(0))
    before = weights.read_bytes()
    _full_disk_for(monkeypatch, lambda p: ".tmp-" in p.name)
    with pytest.raises(DifforgeError) as excinfo:
        write_bytes_atomic(target, b"new")
    assert _one_line_error(excinfo).startswith("no space left on device while writing")
    assert str(target) in str(excinfo.value)
    with pytest.raises(DifforgeError, match="no space left on device"):
        save_tensors_atomic(weights, _tensors(1))
    assert target.read_bytes() == b"old" and weights.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "w.safetensors"]


# ---- stale temporaries -------------------------------------------------------------------------


def test_remove_stale_temporaries_of_a_killed_writer(tmp_path: Path) -> None:
    run = _run(tmp_path, steps=(1,))
    staging = run / "checkpoints" / ".tmp-step_00000002-99999"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    pruned = run / "checkpoints" / ".tmp-step_00000000-4242-pruned"
    pruned.mkdir()
    stale_files = [
        run / ".ema.safetensors.tmp-31337",
        run / f".{WEIGHTS_RECORD}.tmp-1",
        run / "samples" / ".step_00000002.png.tmp-77",
    ]
    (run / "samples").mkdir()
    for path in stale_files:
        path.write_bytes(b"x")
    kept = [run / ".hidden", run / "notes.tmp-1", run / "samples" / "step_00000001.png"]
    for path in kept:
        path.write_bytes(b"keep")
    removed = remove_stale_temporaries(run)
    assert removed == sorted([staging, pruned, *stale_files])
    assert all(path.exists() for path in kept) and not _temporaries(run)
    assert intact_checkpoints(run)[0] == checkpoint_dirs(run)
    assert remove_stale_temporaries(run) == [] and remove_stale_temporaries(tmp_path / "absent") == []


def test_the_config_name_matches_the_run_config() -> None:
    assert storage.CONFIG_NAME == CONFIG_FILE
