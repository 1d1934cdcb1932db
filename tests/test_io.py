import pytest
import torch

from nas_dose.errors import NasDoseError
from nas_dose.io import atomic_path, load_checkpoint, save_checkpoint


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list(target.parent.iterdir())) == 1


def test_checkpoint_round_trip_and_corruption(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"w": torch.arange(4.0), "step": 3})
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4.0))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(NasDoseError, match="ck.pt: not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(NasDoseError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
