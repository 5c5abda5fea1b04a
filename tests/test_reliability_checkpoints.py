"""Reliability, corrupt and foreign checkpoints: each refused with one clear line.

Every case asserts its outcome: exit code 2 with one line ``rgkern <command>: error: ...``
naming the file, and the file left alone; or a correct load. The shared run folder and the
helpers are in ``conftest.py`` and ``utils.py``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import rgkern
from rgkern.tools.checkpoint import CheckpointError, load_checkpoint, read_document, save_checkpoint
from rgkern.tools.presets import make_config
from rgkern.tools.train import CHECKPOINT_NAME, build_model

from utils import TRAIN, assert_one_line_error, run


# ----------------------------------------------------------------------------- 2. corrupt and foreign checkpoints
def _rewrite(source: Path, target: Path, document=None, tensors=None, table=None, drop=()):
    """Copy a checkpoint, changing its document / tensors / checksum table with the given functions."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        values = {k: handle.get_tensor(k) for k in handle.keys()}
    if document is not None:
        metadata["rgkern"] = document(json.loads(metadata["rgkern"]))
        if not isinstance(metadata["rgkern"], str):
            metadata["rgkern"] = json.dumps(metadata["rgkern"])
    if tensors is not None:
        values = tensors(values)
    if table is not None:
        metadata["rgkern.sha256"] = json.dumps(table(json.loads(metadata["rgkern.sha256"])))
    for key in drop:
        metadata.pop(key, None)
    save_file(values, str(target), metadata=metadata)
    return target


def _flip_a_tensor_byte(source, target, name="model.sublayers.0.networks.directions.0"):
    """Copy ``source`` with one bit flipped in the middle of tensor ``name``'s data."""
    data = bytearray(source.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + header_size])[name]["data_offsets"]
    data[8 + header_size + (begin + end) // 2] ^= 0x10
    target.write_bytes(bytes(data))


def _with_nan(values):
    values = dict(values)
    name = next(k for k in values if k.startswith("model.") and k.endswith("directions.0"))
    values[name] = values[name].clone()
    values[name][0, 0, 0, 0, :3] = float("nan")
    return values


def _foreign_model_tensors(source, target):
    """Tensors of another architecture (n_layers 2) under the checkpoint's own config, checksums consistent."""
    other = build_model(make_config("tiny", model={"n_layers": 2}), 32, 3)
    save_checkpoint(target, other)
    config = read_document(source)["config"]
    _rewrite(target, target.with_name("tmp.safetensors"), document=lambda d: {**d, "config": config})
    os.replace(target.with_name("tmp.safetensors"), target)


def _extra_tensor(source, target):
    model = rgkern.tools.checkpoint.load_model(source)
    model.register_buffer("extra_weight", torch.ones(3))
    save_checkpoint(target, model)


BAD_FILES = {
    "missing": (lambda s, t: None, "does not exist"),
    "folder-named-like-it": (lambda s, t: t.mkdir(), "is a folder"),
    "empty": (lambda s, t: t.write_bytes(b""), "only 0 bytes"),
    "random-bytes": (lambda s, t: t.write_bytes(np.random.default_rng(0).bytes(4096)), "not a safetensors file"),
    "truncated": (lambda s, t: t.write_bytes(s.read_bytes()[: s.stat().st_size // 2]), "corrupt"),
    "a-png": (lambda s, t: shutil.copy(s.parent / "samples.png", t), "not a safetensors file"),
    "a-torch-pickle": (lambda s, t: torch.save({"w": torch.ones(3)}, t), "not a safetensors file"),
    "plain-safetensors": (lambda s, t: __import__("safetensors.torch").torch.save_file({"w": torch.ones(3)}, str(t)), "not an rgkern checkpoint"),
    "metadata-not-json": (lambda s, t: _rewrite(s, t, document=lambda d: "{broken"), "not JSON"),
    "no-config": (lambda s, t: _rewrite(s, t, document=lambda d: {k: v for k, v in d.items() if k != "config"}), "no model config"),
    "future-format": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "format": 99}), "format 99"),
    "flipped-byte": (_flip_a_tensor_byte, "checksum mismatch"),
    "tensor-removed": (lambda s, t: _rewrite(s, t, tensors=lambda v: {k: x for k, x in v.items() if not k.endswith("s_scale")}), "tensors missing"),
    "checksum-table-edited": (lambda s, t: _rewrite(s, t, table=lambda tab: {**tab, next(iter(tab)): "0" * 64}), "checksum table does not match"),
    "nan-weights-old-format": (lambda s, t: _rewrite(s, t, tensors=_with_nan, drop=("rgkern.sha256",)), "non-finite weights"),
    "other-architecture": (_foreign_model_tensors, "tensors of other shapes"),
    "extra-tensor": (_extra_tensor, "extra_weight"),
    "invalid-config": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "config": {**d["config"], "image_size": 33}}), "invalid model config"),
    "unknown-setting": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "config": {**d["config"], "warp_drive": 1}}), "cannot build"),
    # Memory bombs: a small file whose document names a huge model is refused before any allocation.
    "config-hidden-huge": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "config": {**d["config"], "hidden": 4194304, "n_mlp": 2}}),
                           "names a model of"),
    "config-channels-huge": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "config": {**d["config"], "channels": 10**9}}),
                             "names a model of"),
    "config-n-layers-huge": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "config": {**d["config"], "n_layers": 10**6}}),
                             "names a model of"),
    "config-image-size-huge": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "config": {**d["config"], "image_size": 2**18}}),
                               "image_size 262144, above the 1024"),
    "info-a-list": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "info": [1, 2]}), "its info is a list"),
    "train-config-a-string": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "info": {**d["info"], "train_config": "fast"}}),
                              "its info.train_config is a str"),
    "negative-step": (lambda s, t: _rewrite(s, t, document=lambda d: {**d, "step": -5}), "its step is -5, not an int >= 0"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_checkpoint_file_is_refused_with_a_clear_line(kind, run_folder, tmp_path, capsys):
    make, fragment = BAD_FILES[kind]
    target = tmp_path / "model.safetensors"
    make(run_folder / CHECKPOINT_NAME, target)
    before = target.read_bytes() if target.is_file() else None
    assert_one_line_error(run(["evaluate", "--checkpoint", target, "--no-progress"], capsys), "evaluate", fragment, str(target))
    if before is not None:
        assert target.read_bytes() == before  # left alone


@pytest.mark.parametrize("command", ["sample", "inpaint", "receptive-fields", "evaluate"])
def test_every_command_refuses_a_flipped_byte(command, run_folder, tmp_path, capsys):
    target = tmp_path / "model.safetensors"
    _flip_a_tensor_byte(run_folder / CHECKPOINT_NAME, target)
    args = [command, "--checkpoint", tmp_path, "--no-progress"]
    args += {"sample": ["--out", tmp_path / "s.png"], "inpaint": ["--out", tmp_path / "o"], "receptive-fields": ["--out", tmp_path / "r.png"]}.get(command, [])
    line = assert_one_line_error(run(args, capsys), command, "checksum mismatch")
    assert "model.sublayers.0.networks.directions.0" in line  # names the damaged tensor
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "change, setting",
    [({"hidden": 16, "n_mlp": 1}, "hidden"), ({"n_layers": 2}, "n_layers"), ({"n_mlp": 1}, "n_mlp")],
    ids=["hidden", "more-layers", "n_mlp"],
)
def test_a_checkpoint_of_another_architecture_names_what_differs(change, setting, run_folder):
    other = build_model(make_config("tiny", model=change), 32, 3)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(run_folder / CHECKPOINT_NAME, other)
    message = str(error.value)
    assert "different model config" in message and f"'{setting}'" in message and "tensors of other shapes" in message


def test_a_checkpoint_of_other_channels_names_channels(run_folder):
    with pytest.raises(CheckpointError, match=r"'channels': \(3, 1\)"):
        load_checkpoint(run_folder / CHECKPOINT_NAME, build_model(make_config("tiny"), 32, 1))


def test_resume_from_another_architecture_is_one_line(run_copy, capsys):
    other = build_model(make_config("tiny", model={"n_layers": 2}), 32, 3)
    save_checkpoint(run_copy / CHECKPOINT_NAME, other, step=4)
    line = assert_one_line_error(run(TRAIN + ["--out", run_copy, "--steps", "8", "--resume"], capsys), "train", "n_layers")
    assert "different model config" in line


def test_checkpoints_from_before_checksums_still_load(run_folder, tmp_path, trained):
    old = _rewrite(run_folder / CHECKPOINT_NAME, tmp_path / "old.safetensors", document=lambda d: {k: v for k, v in d.items() if k != "tensors_sha256"}, drop=("rgkern.sha256",))
    state = load_checkpoint(old)
    assert state["verified"] is False and state["step"] == 4
    for (name, a), b in zip(state["model"].state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_checkpoint(run_folder / CHECKPOINT_NAME)["verified"] is True


def test_saving_non_finite_weights_is_refused(trained, tmp_path):
    model = build_model(make_config("tiny"), 32, 3)
    model.load_state_dict(trained.state_dict())
    with torch.no_grad():
        model.sublayers[0].networks.s_scale[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"NaN or inf.*sublayers\.0\.networks\.s_scale"):
        save_checkpoint(tmp_path / "m.safetensors", model)
    assert list(tmp_path.iterdir()) == []


def test_loading_onto_a_device_this_machine_lacks(run_folder):
    for device, message in (("meta", "meta"), ("nonsense", "unknown device")):
        with pytest.raises(ValueError, match=message):
            load_checkpoint(run_folder / CHECKPOINT_NAME, map_location=device)
