import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nas_dose.cli.predict import main as predict_main
from nas_dose.data.dataset import CHANNELS, IN_CHANNELS
from nas_dose.data.openkbp import read_submission_csv
from nas_dose.data.resample import downsample_patient, upsample_dose
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.data.tta import TTA_FLIPS, flip_tta
from nas_dose.errors import NasDoseError
from nas_dose.inference import predict_patients
from nas_dose.io import load_yaml
from nas_dose.predict import write_outputs
from nas_dose.runtime import Runtime, RuntimeConfig

RIGHT, LEFT = CHANNELS.index("RightParotid"), CHANNELS.index("LeftParotid")


@pytest.fixture(scope="module")
def coarse(tmp_path_factory) -> Path:
    """4 synthetic patients made on a 32³ grid and stored downsampled by 2 (16³)."""
    path = tmp_path_factory.mktemp("data") / "coarse16.h5"
    patients = (downsample_patient(p, 2) for p in synth_patients(4, 32, seed=1))
    write_dataset(path, patients, source="synth32", grid=16)
    return path


@pytest.fixture(scope="module")
def run(coarse, train_tiny, tmp_path_factory) -> Path:
    """A tiny U-Net trained for one epoch on the downsampled data set."""
    return train_tiny(coarse, tmp_path_factory.mktemp("runs") / "tiny")


def predict_cli(**kwargs) -> None:
    args = {"split": None, "tta": False, "csv": True, "format": None, "preference": None, "sweep": None,
            "config": None, "force": False, "overrides": ["runtime.device=cpu", "runtime.threads=1"]}
    args.update(kwargs)
    predict_main(argparse.Namespace(**args))


def test_predict_writes_hdf5_and_csvs_on_the_source_grid(coarse, run, tmp_path):
    out = tmp_path / "pred"
    predict_cli(model=run, data=coarse, out=out, split="validation")
    with open_data(coarse) as data, open_data(out / "predictions.h5") as preds:
        ids = data.ids("validation")
        assert preds.kind == "predictions" and preds.grid == 16 and preds.ids() == ids
        assert sorted(p.name for p in (out / "submission").iterdir()) == sorted(f"{pid}.csv" for pid in ids)
        for pid in ids:
            patient = data.read(pid)
            dose = preds.read_dose(pid)
            assert preds.patient_attrs(pid)["voxel_mm"] == data.patient_attrs(pid)["voxel_mm"]
            assert np.isfinite(dose).all() and dose.min() >= 0
            assert not dose[~patient.possible_dose_mask].any() and dose[patient.possible_dose_mask].any()
            # The CSV is on the 32³ source grid: upsampled back, zero outside the source mask.
            source_mask = data.source_mask(pid)
            csv = read_submission_csv(out / "submission" / f"{pid}.csv", shape=(32, 32, 32))
            np.testing.assert_array_equal(csv, upsample_dose(dose, 2, mask=source_mask))
            assert not csv[~source_mask].any() and csv[source_mask].any()
    record = load_yaml(out / "config.yaml")
    assert record["model"] == str(run) and record["split"] == "validation" and record["tta"] is False
    assert record["runtime"]["device"] == "cpu"
    assert not list(out.glob(".*"))  # no staging folder or temporary file left


def test_no_csv_removes_earlier_csvs(coarse, run, tmp_path):
    out = tmp_path / "pred"
    predict_cli(model=run, data=coarse, out=out)
    assert len(list((out / "submission").iterdir())) == 4
    predict_cli(model=run, data=coarse, out=out, csv=False, force=True)
    assert not (out / "submission").exists() and (out / "predictions.h5").is_file()


@pytest.mark.parametrize("bad, message", [
    ("model", "not a readable checkpoint"),
    ("data", "file not found"),
    ("split", "no patients in split 'test'"),
])
def test_bad_inputs_write_nothing(coarse, run, tmp_path, bad, message):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((run / "best.pt").read_bytes()[:1000])
    args = {"model": run, "data": coarse, "out": tmp_path / "pred", "split": "validation"}
    args.update({"model": {"model": truncated}, "data": {"data": tmp_path / "missing.h5"},
                 "split": {"split": "test"}}[bad])
    with pytest.raises(NasDoseError, match=message):
        predict_cli(**args)
    assert not (tmp_path / "pred").exists()


class Pointwise(nn.Module):
    """A 1×1×1 convolution: equivariant to every flip; with equal parotid weights also to the swap."""

    def __init__(self, symmetric: bool) -> None:
        super().__init__()
        self.conv = nn.Conv3d(IN_CHANNELS, 1, 1)
        with torch.no_grad():
            self.conv.weight.uniform_(-1, 1)
            if symmetric:
                self.conv.weight[0, LEFT] = self.conv.weight[0, RIGHT]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AxisRamp(Pointwise):
    """Adds a ramp along axes 0 and 1: not equivariant to those flips."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h = x.shape[2], x.shape[3]
        ramp = torch.arange(d).view(d, 1, 1) / d + torch.arange(h).view(1, h, 1) / (2 * h)
        return self.conv(x) + ramp


def test_flip_tta_of_an_equivariant_model_equals_no_tta(coarse):
    torch.manual_seed(0)
    model = Pointwise(symmetric=True).eval()
    rt = Runtime(RuntimeConfig(device="cpu"))
    with open_data(coarse) as data:
        ids = data.ids()
        plain = dict(predict_patients(model, data, ids, rt, tta=False))
        tta = dict(predict_patients(model, data, ids, rt, tta=True))
    for pid in ids:
        assert plain[pid].any()
        np.testing.assert_allclose(tta[pid], plain[pid], rtol=1e-5, atol=1e-5)


def test_flip_tta_averages_the_flips_with_the_parotids_swapped_when_mirrored():
    torch.manual_seed(0)
    model = AxisRamp(symmetric=False).eval()
    x = torch.rand(1, IN_CHANNELS, 6, 5, 4)
    swapped = x.clone()
    swapped[:, [RIGHT, LEFT]] = x[:, [LEFT, RIGHT]]
    with torch.no_grad():
        expected = (model(x)
                    + model(swapped.flip(2)).flip(2)           # anterior-posterior flip mirrors
                    + model(swapped.flip(3)).flip(3)           # right-left flip mirrors
                    + model(x.flip(2, 3)).flip(2, 3)) / 4      # both: a rotation, no swap
        got = flip_tta(model, x)
        assert len(TTA_FLIPS) == 4
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got, model(x), atol=1e-3)


def test_write_outputs_takes_any_predictor(coarse, tmp_path):
    """An ensemble is any callable: here two constants averaged, 0.5 -> 35 Gy inside the mask."""
    members = [lambda x: torch.full_like(x[:, :1], 0.25), lambda x: torch.full_like(x[:, :1], 0.75)]

    def ensemble(x: torch.Tensor) -> torch.Tensor:
        return sum(m(x) for m in members) / len(members)

    rt = Runtime(RuntimeConfig(device="cpu"))
    with open_data(coarse) as data:
        ids = write_outputs(ensemble, data, "train", rt, tmp_path / "pred", model="mean of 2", csv=False)
        with open_data(tmp_path / "pred" / "predictions.h5") as preds:
            for pid in ids:
                mask = data.read(pid).possible_dose_mask
                np.testing.assert_array_equal(preds.read_dose(pid), np.where(mask, 35.0, 0.0).astype(np.float32))
    assert load_yaml(tmp_path / "pred" / "config.yaml")["model"] == "mean of 2"
