"""The teacher cache: computed once, reused, recomputed for another teacher or data set, never
written over a foreign file, and under torchrun each rank predicts its share; and the teacher's
prediction augmented exactly like the target.

This file is also the script torchrun starts: `python tests/test_distill_teacher.py SPEC.json`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from nas_dose import distributed
from nas_dose.data.augment import AugmentConfig
from nas_dose.data.dataset import DoseDataset
from nas_dose.data.store import open_data, write_predictions
from nas_dose.distill import teacher as teacher_module
from nas_dose.distill.teacher import KEY_ATTR, TeacherDataset, ensure_cache, teacher_key
from nas_dose.errors import NasDoseError
from nas_dose.io import load_json, save_json
from nas_dose.runtime import Runtime, RuntimeConfig

CPU = Runtime(RuntimeConfig(device="cpu"))
# every transform, often: flips, 40° rotations, shifts
AUGMENT = AugmentConfig(probability=0.9)


class Counting(nn.Module):
    """A teacher that predicts 0.9 × the PTV map and counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 0.9 * x[:, 1:2]


def test_cache_is_written_once_and_reused(data, tmp_path):
    with open_data(data) as d:
        ids = d.ids("train") + d.ids("validation")
    teacher, loads = Counting(), []

    def load() -> nn.Module:
        loads.append(1)
        return teacher

    cache = tmp_path / "teacher.h5"
    assert ensure_cache(cache, "k1", data, ids, load, CPU, 16) is True
    assert teacher.calls == len(ids) == 8 and len(loads) == 1
    with open_data(cache) as c, open_data(data) as d:
        assert c.kind == "predictions" and c.ids() == ids
        assert {c.patient_attrs(pid)[KEY_ATTR] for pid in ids} == {"k1"}
        p = d.read(ids[0])
        expected = np.where(p.possible_dose_mask, 0.9 * 70 * np.maximum.reduce(
            [p.structures[s] * v for s, v in (("PTV70", 1.0), ("PTV63", 0.9), ("PTV56", 0.8)) if s in p.structures]), 0)
        np.testing.assert_allclose(c.read_dose(ids[0]), expected, rtol=1e-5, atol=1e-4)
    # reused: the teacher is neither loaded nor run again
    assert ensure_cache(cache, "k1", data, ids, load, CPU, 16) is False
    assert ensure_cache(cache, "k1", data, ids[:3], load, CPU, 16) is False
    assert teacher.calls == 8 and len(loads) == 1
    # another teacher or data set (another key): recomputed
    assert ensure_cache(cache, "k2", data, ids, load, CPU, 16) is True
    assert teacher.calls == 16 and len(loads) == 2


@pytest.mark.slow
def test_two_processes_share_the_patients_and_write_the_one_process_cache(data, tmp_path):
    with open_data(data) as d:
        ids = d.ids()[::-1]  # not the file's order: the merged cache must keep this one
    one = tmp_path / "one.h5"
    assert ensure_cache(one, "k1", data, ids, Counting, CPU, 16) is True
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"data": str(data), "out": str(tmp_path / "two"), "ids": ids}))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(spec)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = load_json(tmp_path / "two" / "result.json")
    # each rank predicted its half alone, once; the second call reused the merged cache
    assert result["ran"] == [True, False]
    assert result["ranks"] == [{"rank": r, "predicted": ids[r::2], "calls": 4} for r in range(2)]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["result.json", "teacher.h5"]
    with open_data(one) as a, open_data(tmp_path / "two" / "teacher.h5") as b:
        assert a.ids() == b.ids() == ids and a.attrs == b.attrs
        for pid in ids:
            assert a.patient_attrs(pid) == b.patient_attrs(pid)
            np.testing.assert_array_equal(a.read_dose(pid), b.read_dose(pid))


def _two_ranks(spec: dict[str, Any]) -> None:
    """Run by each rank: the cache twice (made, then reused); what each rank predicted, gathered."""
    out, ids = Path(spec["out"]), spec["ids"]
    torch.set_num_threads(1)
    predicted: list[str] = []
    predict = teacher_module.predictions

    def recording(predictor: Any, d: Any, share: list[str], runtime: Runtime) -> Any:
        predicted.extend(share)
        return predict(predictor, d, share, runtime)

    teacher_module.predictions = recording  # type: ignore[assignment]
    teacher = Counting()
    with distributed.session():
        ran = [ensure_cache(out / "teacher.h5", "k1", Path(spec["data"]), ids, lambda: teacher, CPU, 16)
               for _ in range(2)]
        ranks = distributed.gather_objects([{"rank": distributed.rank(), "predicted": predicted,
                                             "calls": teacher.calls}])
        save_json(out / "result.json", {"ran": ran, "ranks": ranks})


def test_a_foreign_file_is_never_overwritten(data, tmp_path):
    before = data.read_bytes()
    with pytest.raises(NasDoseError, match=f"{data}: exists and is not a teacher cache"):
        ensure_cache(data, "k", data, ["pt_1"], Counting, CPU, 16)
    assert data.read_bytes() == before


def test_key_follows_the_teacher_and_data_files(data, tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    checkpoint.write_bytes(b"weights v1")
    copy = tmp_path / "copy.h5"
    copy.write_bytes(data.read_bytes())
    key = teacher_key(checkpoint, data)
    assert key == teacher_key(checkpoint, copy) and len(key) == 64
    checkpoint.write_bytes(b"weights v2")
    assert teacher_key(checkpoint, data) != key
    with copy.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert teacher_key(checkpoint, copy) != teacher_key(checkpoint, data)
    with pytest.raises(NasDoseError, match="absent.pt: file not found"):
        teacher_key(tmp_path / "absent.pt", data)


def reference_as_teacher(data: Path, cache: Path) -> None:
    """A cache whose teacher predicted exactly the reference dose."""
    with open_data(data) as d:
        write_predictions(cache, ((pid, d.read_dose(pid), {KEY_ATTR: "ref"}) for pid in d.ids()), grid=d.grid)


def test_cached_teacher_is_augmented_like_the_target(data, tmp_path):
    cache = tmp_path / "teacher.h5"
    reference_as_teacher(data, cache)
    distill = TeacherDataset(data, "train", cache, augment=AUGMENT, seed=3)
    plain = DoseDataset(data, "train", augment=AUGMENT, seed=3)
    unaugmented = DoseDataset(data, "train")
    moved = 0
    for epoch in range(2):
        for index in range(len(distill)):
            item, ref = distill[index, epoch], plain[index, epoch]
            # the student sees exactly what plain training sees ...
            for key in ("input", "target", "mask"):
                assert torch.equal(item[key], ref[key]), key
            # ... and a teacher equal to the reference dose stays equal to the target
            assert torch.equal(item["teacher"], item["target"])
            assert item["teacher"].shape == (1, 16, 16, 16) and item["teacher"].abs().sum() > 0
            moved += not torch.equal(item["mask"], unaugmented[index]["mask"])
    assert moved >= len(distill)  # the transforms did move the patients


def test_unlabeled_patients_follow_the_training_split_without_a_target(unlabeled_data, tmp_path):
    cache = tmp_path / "teacher.h5"
    with open_data(unlabeled_data) as d:
        train, unlabeled = d.ids("train"), d.ids("unlabeled")
        write_predictions(cache, ((pid, np.full((16,) * 3, 7.0, np.float32), {KEY_ATTR: "k"}) for pid in d.ids()),
                          grid=16)
    distill = TeacherDataset(unlabeled_data, "train", cache, augment=AUGMENT, seed=3, unlabeled_split="unlabeled")
    plain = DoseDataset(unlabeled_data, "train", augment=AUGMENT, seed=3)
    assert distill.ids == train + unlabeled and len(unlabeled) == 4
    for index, pid in enumerate(distill.ids):
        item = distill[index, 1]
        assert item["labeled"].item() == (pid in train)
        if pid in train:  # the labeled items are plain training's
            assert torch.equal(item["target"], plain[index, 1]["target"]) and item["target"].sum() > 0
        else:  # an unlabeled one: zero target, the teacher's dose inside its mask
            assert item["target"].abs().sum() == 0
            assert torch.equal(item["teacher"], item["mask"] * np.float32(7.0 / 70.0))
    # without `unlabeled_split` they are left out
    assert TeacherDataset(unlabeled_data, "train", cache).ids == train


def test_dataset_rejects_a_cache_without_the_patients(data, tmp_path):
    cache = tmp_path / "partial.h5"
    with open_data(data) as d:
        write_predictions(cache, [(pid, d.read_dose(pid), {KEY_ATTR: "x"}) for pid in d.ids("validation")], grid=16)
    with pytest.raises(NasDoseError, match=f"{cache}: holds no teacher prediction .* pt_1"):
        TeacherDataset(data, "train", cache)


if __name__ == "__main__":
    _two_ranks(json.loads(Path(sys.argv[1]).read_text()))
