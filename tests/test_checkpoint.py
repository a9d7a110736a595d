"""Checkpoint I/O: restricted .pkl reading, .pth/.safetensors layouts, load reports, atomic saves."""
from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from eco_m2f.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_state_dict_file,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)


class _Tiny(nn.Module):
    """conv (weight, bias) + BatchNorm (with num_batches_tracked) + linear."""

    def __init__(self, out: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, out)


def _numpy_sd(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


class _RunsCode:
    """Unpickling this calls os.system: a checkpoint that executes code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CustomObject:
    def __init__(self) -> None:
        self.value = 3


# ------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pkl_detectron2_layout_loads(tmp_path: Path, protocol: int) -> None:
    arrays = collections.OrderedDict(
        [
            ("backbone.stem.conv1.weight", np.random.rand(4, 3, 7, 7).astype(np.float32)),
            ("backbone.res2.0.conv1.norm.running_var", np.arange(4, dtype=np.float64)),
            ("sem_seg_head.step", np.int64(7)),
        ]
    )
    path = tmp_path / "model.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f, protocol)
    ckpt = read_checkpoint(path)
    assert ckpt.matching_heuristics is True
    assert ckpt.author == "Detectron2 Model Zoo"
    assert set(ckpt.state_dict) == set(arrays)
    w = ckpt.state_dict["backbone.stem.conv1.weight"]
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32 and tuple(w.shape) == (4, 3, 7, 7)
    assert torch.equal(w, torch.from_numpy(arrays["backbone.stem.conv1.weight"]))
    assert ckpt.state_dict["backbone.res2.0.conv1.norm.running_var"].dtype == torch.float64
    assert ckpt.state_dict["sem_seg_head.step"].item() == 7


def test_pkl_bare_dict_loads(tmp_path: Path) -> None:
    path = tmp_path / "bare.pkl"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": np.ones((2, 2), np.float32)}, f)
    sd = load_state_dict_file(path)
    assert list(sd) == ["conv1.weight"] and sd["conv1.weight"].sum().item() == 4.0
    assert read_checkpoint(path).matching_heuristics is False


def test_pkl_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "payload": _RunsCode(marker)}, f)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{os.system.__module__}.system" in message  # posix.system on Linux
    assert not marker.exists(), "the pickled os.system call was executed"


def test_pkl_with_custom_object_names_the_class(tmp_path: Path) -> None:
    path = tmp_path / "object.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "obj": _CustomObject()}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"_CustomObject") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_pkl_with_non_array_weight_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "strings.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2), "name": "not a tensor"}}, f)
    with pytest.raises(CheckpointError, match=r"'name'"):
        read_checkpoint(path)


def test_corrupt_pkl_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pkl"
    data = pickle.dumps({"model": {"w": np.zeros(100)}})
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="broken.pkl"):
        read_checkpoint(path)


@pytest.mark.parametrize("layout", ["model", "state_dict", "bare"])
def test_pth_layouts(tmp_path: Path, layout: str) -> None:
    model = _Tiny()
    sd = model.state_dict()
    obj = {"model": sd, "iteration": 5} if layout == "model" else {"state_dict": sd} if layout == "state_dict" else sd
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    ckpt = read_checkpoint(path)
    assert set(ckpt.state_dict) == set(sd)
    for key in sd:
        assert torch.equal(ckpt.state_dict[key], sd[key])
    if layout == "model":
        assert ckpt.extra["iteration"] == 5


def test_pth_with_arbitrary_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "object.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "obj": _CustomObject()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(path)


def test_safetensors_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5)}
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    out = load_state_dict_file(path)
    assert set(out) == set(sd) and torch.equal(out["a.weight"], sd["a.weight"]) and torch.equal(out["b.bias"], sd["b.bias"])


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_state_dict_file(tmp_path / "nope.pth")
    other = tmp_path / "weights.h5"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"Unknown checkpoint extension '\.h5'.*\.pkl"):
        load_state_dict_file(other)


def test_detectron2_model_zoo_paths_are_downloaded_to_the_cache(tmp_path: Path, monkeypatch) -> None:
    from iopath.common.file_io import PathManager

    local = tmp_path / "R-50.pkl"
    with open(local, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros((1,), np.float32)}, "matching_heuristics": True}, f)
    asked = []

    def fake_get_local_path(self, url, **kwargs):
        asked.append(url)
        return str(local)

    monkeypatch.setattr(PathManager, "get_local_path", fake_get_local_path)
    ckpt = read_checkpoint("detectron2://ImageNetPretrained/torchvision/R-50.pkl")
    assert asked == ["https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl"]
    assert ckpt.matching_heuristics and list(ckpt.state_dict) == ["stem.conv1.weight"]


def test_unrecognised_layout_lists_top_level_keys(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"weights": {"w": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"weights.*epoch"):
        read_checkpoint(path)


# ------------------------------------------------------------------------------------ loading


def test_load_weights_exact_match(tmp_path: Path) -> None:
    src, dst = _Tiny(), _Tiny()
    with torch.no_grad():
        src.bn.running_mean.uniform_()
        src.bn.num_batches_tracked.fill_(11)
    path = tmp_path / "d2.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": _numpy_sd(src), "__author__": "test"}, f)
    report = load_weights(dst, path)
    assert report.clean and len(report.loaded) == len(src.state_dict())
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_load_weights_mismatch_fails_and_lists_keys() -> None:
    src, dst = _Tiny(out=4), _Tiny(out=6)  # fc has another shape
    sd = src.state_dict()
    sd.pop("conv.bias")  # missing
    sd["extra.weight"] = torch.zeros(2, 3)  # unexpected
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(dst, sd)
    message = str(info.value)
    assert "conv.bias [8]" in message  # missing, with the model's shape
    assert "extra.weight [2, 3]" in message  # unexpected, with the checkpoint's shape
    assert "fc.weight: [4, 8] vs [6, 8]" in message
    report = info.value.report
    assert report.missing_keys == ["conv.bias"]
    assert report.unexpected_keys == ["extra.weight"]
    assert report.mismatched_keys == ["fc.weight", "fc.bias"]
    for key, value in dst.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key


def test_load_weights_allow_flags() -> None:
    src, dst = _Tiny(out=4), _Tiny(out=6)
    sd = src.state_dict()
    sd.pop("conv.bias")
    sd["extra.weight"] = torch.zeros(2, 3)
    # each allow_* flag only covers its own kind of problem
    with pytest.raises(CheckpointMismatchError, match="refused: unexpected keys, shape mismatches"):
        load_weights(dst, sd, allow_missing=True)
    report = load_weights(dst, sd, allow_missing=True, allow_unexpected=True, allow_shape_mismatch=True)
    assert not report.clean
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert not torch.equal(dst.conv.bias, src.conv.bias)  # stayed as initialised
    assert dst.fc.weight.shape == (6, 8)
    assert "conv.weight" in report.loaded and "fc.weight" not in report.loaded


def test_load_weights_key_map_dict_and_callable() -> None:
    src, dst = _Tiny(), _Tiny()
    renamed = {f"old_{k}": v for k, v in src.state_dict().items()}
    report = load_weights(dst, renamed, key_map=lambda sd: {k[len("old_"):]: v for k, v in sd.items()})
    assert report.clean and torch.equal(dst.fc.weight, src.fc.weight)
    dst2 = _Tiny()
    report = load_weights(dst2, renamed, key_map={f"old_{k}": k for k in src.state_dict()})
    assert report.clean and torch.equal(dst2.conv.weight, src.conv.weight)


def test_num_batches_tracked_is_benign() -> None:
    from torchvision.ops import FrozenBatchNorm2d

    bn_model = _Tiny()
    frozen_model = _Tiny()
    frozen_model.bn = FrozenBatchNorm2d(8)
    # SyncBN checkpoint (has num_batches_tracked) into FrozenBN: ignored, not unexpected
    report = load_weights(frozen_model, bn_model.state_dict())
    assert report.clean and report.ignored == ["bn.num_batches_tracked"]
    # FrozenBN checkpoint (no num_batches_tracked) into BN: untouched, not missing
    report = load_weights(_Tiny(), frozen_model.state_dict())
    assert report.clean and report.untouched == ["bn.num_batches_tracked"]


def test_wrapper_prefixes_are_stripped() -> None:
    src, dst = _Tiny(), _Tiny()
    ddp_sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    assert load_weights(dst, {"state_dict": ddp_sd}).clean
    assert torch.equal(dst.conv.weight, src.conv.weight)


def test_model_level_key_map_is_used() -> None:
    class Renaming(_Tiny):
        def checkpoint_key_map(self, sd):
            return {k.replace("legacy_conv.", "conv."): v for k, v in sd.items()}

    src, dst = _Tiny(), Renaming()
    sd = {k.replace("conv.", "legacy_conv."): v for k, v in src.state_dict().items()}
    assert load_weights(dst, sd).clean
    assert torch.equal(dst.conv.weight, src.conv.weight)


def test_keys_loaded_elsewhere_may_be_absent() -> None:
    class WithGate(_Tiny):
        def keys_loaded_elsewhere(self):
            return {"fc.weight", "fc.bias"}

    src, dst = _Tiny(), WithGate()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    report = load_weights(dst, sd)
    assert report.clean and {"fc.weight", "fc.bias"} <= set(report.untouched)
    with pytest.raises(CheckpointMismatchError, match="fc.weight"):
        load_weights(_Tiny(), sd)


# ------------------------------------------------------------------------------------ saving


def test_save_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _Tiny()
    path = save_checkpoint(tmp_path / "out" / "model_final.pth", model, iteration=42)
    raw = torch.load(path, weights_only=True)
    assert raw["iteration"] == 42 and set(raw["model"]) == set(model.state_dict())
    fresh = _Tiny()
    assert load_weights(fresh, path).clean
    assert torch.equal(fresh.fc.weight, model.fc.weight)
    assert [p.name for p in path.parent.iterdir()] == ["model_final.pth"]  # no temp files left


def test_save_checkpoint_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    save_checkpoint(path, _Tiny(), iteration=1)
    with pytest.raises(Exception):
        save_checkpoint(path, _Tiny(), iteration=2, bad=lambda: None)  # lambdas cannot be pickled
    assert torch.load(path, weights_only=True)["iteration"] == 1  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]
    with pytest.raises(ValueError, match=r"\.pth"):
        save_checkpoint(tmp_path / "model.pkl", _Tiny())
