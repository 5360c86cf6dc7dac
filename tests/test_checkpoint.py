"""A run directory is untrusted input: verified on load, never unpickled, never imported from,
never followed outside itself."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from flsec.errors import CheckpointError
from flsec.fl.checkpoint import load_checkpoint, manifest_digest
from flsec.fl.engines import train
from flsec.io import sha256_file, write_json, write_tensors
from flsec.lock import locked_dir

from .conftest import small_config


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def resign(run: Path, edit: Any = None) -> dict[str, Any]:
    """What a hostile author does: edit meta.json, then recompute every hash so that only flsec's
    own checks can stop the run directory."""
    meta = json.loads((run / "meta.json").read_text())
    if edit is not None:
        edit(meta)
    files = meta.get("files")
    for rel in list(files) if isinstance(files, dict) else []:
        path = run / rel
        if path.is_file() and not rel.startswith(("..", "/")):
            files[rel] = sha256_file(path)
    meta["manifest_sha256"] = manifest_digest(meta)
    (run / "meta.json").write_text(json.dumps(meta))
    return meta


def test_meta_lists_every_file_with_its_hash(trained_run: Path) -> None:
    meta = json.loads((trained_run / "meta.json").read_text())
    files = {str(p.relative_to(trained_run)) for p in trained_run.rglob("*") if p.is_file()}
    aliases = {"meta.json", ".lock", "model.safetensors", "history.jsonl"}
    assert set(meta["files"]) == files - aliases
    for rel, digest in meta["files"].items():
        assert sha256_file(trained_run / rel) == digest
    assert meta["manifest_sha256"] == manifest_digest(meta)
    assert meta["versions"]["torch"] and meta["status"] == "complete" and meta["seed"] == 1
    assert meta["model_file"] == "rounds/round_4/model.safetensors"
    # The top-level files are the last round's own (hard links), not stale copies.
    assert (trained_run / "model.safetensors").read_bytes() == (trained_run / meta["model_file"]).read_bytes()
    assert (trained_run / "history.jsonl").read_bytes() == (trained_run / meta["history_file"]).read_bytes()
    assert not list(trained_run.rglob("*.tmp"))
    assert sorted(p.name for p in (trained_run / "rounds").iterdir()) == ["round_4"]


def test_files_are_readable_by_others(trained_run: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for p in trained_run.rglob("*"):
        if p.is_file() and p.name != ".lock":
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


def test_flipped_byte_is_refused(run_copy: Path) -> None:
    meta = json.loads((run_copy / "meta.json").read_text())
    p = run_copy / meta["model_file"]
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(run_copy)


def test_missing_file_is_refused(run_copy: Path) -> None:
    (run_copy / "updates" / "round_4" / "client_0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(run_copy)


@pytest.mark.parametrize("content", [b"{not json", b"[]", b"\xff\xfe\x00", b'{"format": NaN}'])
def test_corrupted_meta_is_refused(run_copy: Path, content: bytes) -> None:
    (run_copy / "meta.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupted|not a flsec-checkpoint"):
        load_checkpoint(run_copy)


def test_edited_manifest_is_refused(run_copy: Path) -> None:
    meta = json.loads((run_copy / "meta.json").read_text())
    meta["malicious_ids"] = [3]  # silently re-label who attacked
    (run_copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="manifest sha256 mismatch"):
        load_checkpoint(run_copy)


@pytest.mark.parametrize(("field", "value", "named"), [
    ("round", "4", "round"), ("seed", -1, "seed"), ("status", "done", "status"), ("files", [], "files"),
    ("input_spec", {"channels": 1}, "input_spec"), ("captures", [{"round": 4}], "captures.0"),
    ("plugins_extra", 1, "plugins_extra"), ("seconds_per_round", ["x"], "seconds_per_round.0"),
])
def test_schema_violations_name_the_field(run_copy: Path, field: str, value: Any, named: str) -> None:
    resign(run_copy, lambda m: m.__setitem__(field, value))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(run_copy)
    assert f"field '{named}" in str(info.value) and "\n" not in str(info.value)


class _Payload:
    """Unpickling this would create a marker file: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_planted_pickle_is_never_executed(run_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    meta = json.loads((run_copy / "meta.json").read_text())
    (run_copy / meta["model_file"]).write_bytes(pickle.dumps(_Payload(marker)))
    resign(run_copy)
    ckpt = load_checkpoint(run_copy)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        ckpt.weights()
    assert not marker.exists()


def test_planted_plugin_module_is_never_imported(run_copy: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "planted_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    resign(run_copy, lambda m: m["config"].__setitem__("plugins", ["planted_mod"]))
    ckpt = load_checkpoint(run_copy)
    ckpt.build_model()
    assert not marker.exists()
    assert ckpt.config.plugins == ["planted_mod"]  # recorded, not acted on


def test_unknown_plugin_name_in_checkpoint_gives_a_hint(run_copy: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["config"]["plugins"] = ["their_rules"]
        m["config"]["aggregation"]["name"] = "their_rule"

    resign(run_copy, edit)
    with pytest.raises(CheckpointError, match="never imports from a run directory: pass --plugin"):
        load_checkpoint(run_copy)


@pytest.mark.parametrize("rel", ["../outside.safetensors", "/etc/hostname", "updates/../../x", "a//b", "C:/x"])
def test_paths_out_of_the_run_directory_are_refused(run_copy: Path, rel: str) -> None:
    resign(run_copy, lambda m: m["files"].__setitem__(rel, "0" * 64))
    with pytest.raises(CheckpointError, match="outside the run directory|not a relative path"):
        load_checkpoint(run_copy)


def test_manifest_cannot_point_the_model_elsewhere(run_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(run_copy / "model.safetensors", outside)
    resign(run_copy, lambda m: m.__setitem__("model_file", "../elsewhere.safetensors"))
    with pytest.raises(CheckpointError, match="does not list"):
        load_checkpoint(run_copy)


def test_symlinked_folder_is_refused_on_load(run_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run_copy / "updates", elsewhere)
    (run_copy / "updates").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_checkpoint(run_copy)


def _train_cut(out: Path, after: int) -> None:
    """Train the small config and stop it after round ``after`` (as Ctrl-C would)."""

    def stop(r: int, _record: dict[str, Any]) -> None:
        if r == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_config(capture={"rounds": "all"}), out, progress=False, on_round_end=stop)


@pytest.mark.parametrize("folder", ["rounds", "updates"])
def test_resume_never_writes_or_deletes_through_a_symlink(tmp_path: Path, folder: str) -> None:
    out = tmp_path / "run"
    _train_cut(out, 2)
    victim = tmp_path / "victim"
    shutil.copytree(out / folder, victim)
    (victim / "keep.txt").write_text("precious")
    before = sorted(p.name for p in victim.rglob("*"))
    shutil.rmtree(out / folder)
    (out / folder).symlink_to(victim)
    with pytest.raises(CheckpointError, match="symbolic link"):
        train(small_config(capture={"rounds": "all"}), out, resume=True, progress=False)
    assert sorted(p.name for p in victim.rglob("*")) == before


def _replace_weights(run: Path, fn: Any) -> None:
    meta = json.loads((run / "meta.json").read_text())
    path = run / meta["model_file"]
    from safetensors.torch import load_file

    tensors = fn(load_file(str(path)))
    path.unlink()
    save_file(tensors, str(path))
    resign(run)


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: {**t, "net.1.weight": torch.full_like(t["net.1.weight"], float("nan"))}, "NaN or Inf"),
    (lambda t: {**t, "net.1.weight": t["net.1.weight"].to(torch.int32)}, "torch.int32"),
    (lambda t: {**t, "net.1.weight": t["net.1.weight"][:1]}, r"the model needs"),
    (lambda t: {k: v for k, v in t.items() if k != "net.1.bias"}, "missing"),
])
def test_bad_tensors_are_refused(run_copy: Path, change: Any, message: str) -> None:
    _replace_weights(run_copy, change)
    ckpt = load_checkpoint(run_copy)
    with pytest.raises(CheckpointError, match=message):
        ckpt.build_model()


def test_capture_of_wrong_shape_is_refused(run_copy: Path) -> None:
    path = run_copy / "updates" / "round_4" / "client_0.safetensors"
    from flsec.fl.checkpoint import read_tensor_metadata, read_tensors

    meta, tensors = read_tensor_metadata(path), read_tensors(path)
    write_tensors(path, {k: v[:10] for k, v in tensors.items()}, meta)
    resign(run_copy)
    with pytest.raises(CheckpointError, match="expected float32 of shape"):
        load_checkpoint(run_copy).capture(4, 0)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_checkpoint(tmp_path)


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with locked_dir(out), pytest.raises(CheckpointError, match="in use by another flsec process"):
        train(small_config(), out, progress=False)
    assert not (out / "meta.json").exists()


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        train(small_config(), tmp_path / "f", progress=False)


def test_non_empty_foreign_directory_is_not_clobbered(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty and holds no flsec run"):
        train(small_config(), tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_identical_content_gives_identical_bytes(tmp_path: Path) -> None:
    t = {"a": torch.arange(4.0), "b": torch.ones(2)}
    meta1 = {f"k{i}": str(i) for i in range(12)}
    meta2 = dict(reversed(list(meta1.items())))
    write_tensors(tmp_path / "1.safetensors", t, meta1)
    write_tensors(tmp_path / "2.safetensors", dict(reversed(list(t.items()))), meta2)
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_json_is_strict(tmp_path: Path) -> None:
    write_json(tmp_path / "m.json", {"asr": float("nan"), "x": [float("inf"), 1.5], "t": torch.tensor([1.0])})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"asr": None, "x": [None, 1.5], "t": [1.0]}


def test_taking_the_lock_removes_what_a_killed_writer_left_half_written(tmp_path: Path) -> None:
    out = tmp_path / "inv"
    (out / "parts").mkdir(parents=True)
    (out / "other").mkdir()
    stale = [out / ".metrics.json.ab12cd.tmp", out / "parts" / ".r1_c0_update.safetensors.x9.tmp"]
    kept = [out / "parts" / "r1_c0_update.safetensors", out / "notes.tmp", out / "other" / ".x.tmp"]
    (out / "other" / ".lock").write_text("")  # another writer's directory: its lock cleans it
    for p in stale + kept:
        p.write_text("x")
    (out / ".link.tmp").symlink_to(tmp_path / "victim.tmp")
    (tmp_path / "victim.tmp").write_text("v")
    with locked_dir(out):
        assert [p.exists() for p in stale] == [False, False]
        assert all(p.exists() for p in kept)
    assert (tmp_path / "victim.tmp").read_text() == "v"
