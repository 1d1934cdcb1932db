"""Extra input channels of a data set (`Patient.extra`; the synthetic beam plate): stored, read,
fed to the model after the standard channels, and refused where a model or stage cannot take them."""
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import nas_dose
from nas_dose import cli
from nas_dose.cascade.patches import CascadeConfig, PatchDataset
from nas_dose.config import ConfigError, load_config
from nas_dose.data.augment import AugmentConfig
from nas_dose.data.dataset import (
    IN_CHANNELS,
    DoseDataset,
    build_input,
    build_item,
    hidden_channels,
    input_channels,
    unhide,
    unhide_order,
)
from nas_dose.data.resample import downsample_patient
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import synth_patient, synth_patients
from nas_dose.errors import NasDoseError
from nas_dose.export import Config as ExportConfig
from nas_dose.export import Inputs as ExportInputs
from nas_dose.export import run as export
from nas_dose.inference import load_model_or_ensemble, open_for, trained_inputs
from nas_dose.io import load_checkpoint
from nas_dose.models.factory import ModelConfig, build_model, data_channels, model_spec, spec_inputs
from nas_dose.search_spaces import get_space, save_genotype
from nas_dose.train import Inputs as TrainInputs
from nas_dose.train import run as train
from nas_dose.training import TrainConfig
from strategies.search import macro_channels

TARGETS = ("PTV56", "PTV63", "PTV70")
PLATE = ("beam_plate",)


def plated(tmp_path: Path, n: int = 4, grid: int = 16, plates: bool = True, name: str = "d.h5") -> Path:
    path = tmp_path / name
    write_dataset(path, synth_patients(n, grid, 0, beam_plates=plates), source="test", grid=grid)
    return path


def test_a_beam_plate_leaves_the_phantom_as_it_was_and_covers_the_targets():
    with_plate, without = synth_patient(3, 32, 0, beam_plates=True), synth_patient(3, 32, 0)
    assert list(with_plate.extra) == ["beam_plate"] and not without.extra
    for name in ("ct", "dose", "possible_dose_mask"):
        assert np.array_equal(getattr(with_plate, name), getattr(without, name))
    plate = with_plate.extra["beam_plate"]
    body = with_plate.ct > 0  # stored as HU + 1024: air outside the patient is 0
    targets = np.logical_or.reduce([with_plate.structures[t] for t in TARGETS if t in with_plate.structures])
    assert plate.dtype == np.float32 and plate.min() >= 0 and plate.max() <= 1
    assert (plate[~body] == 0).all()  # the patient's outline bounds it
    assert plate[targets].mean() > 0.8  # every beam's aperture holds the targets
    assert plate[body & ~targets].mean() < 0.5 * plate[targets].mean()  # beams go where the targets are
    assert np.array_equal(plate, synth_patient(3, 32, 0, beam_plates=True).extra["beam_plate"])


def test_extra_inputs_round_trip_and_follow_the_standard_channels(tmp_path):
    path = plated(tmp_path)
    expected = synth_patient(1, 16, 0, beam_plates=True)
    with open_data(path) as data:
        assert data.extra_channels == ("beam_plate",) and input_channels(data) == IN_CHANNELS + 1
        p = data.read("pt_2")
        assert np.array_equal(p.extra["beam_plate"], expected.extra["beam_plate"])
    assert input_channels(path) == IN_CHANNELS + 1
    x = build_input(p)
    assert x.shape == (IN_CHANNELS + 1, 16, 16, 16)
    assert np.array_equal(x[:IN_CHANNELS], build_input(replace(p, extra={})))
    assert np.array_equal(x[IN_CHANNELS], p.extra["beam_plate"])
    assert DoseDataset(path, "train").in_channels == IN_CHANNELS + 1
    assert input_channels(plated(tmp_path, plates=False, name="plain.h5")) == IN_CHANNELS


def test_augmentation_moves_an_extra_input_like_a_dose():
    p = synth_patient(0, 16, 0, beam_plates=True)
    flips = AugmentConfig(probability=1.0, rotate=False, max_shift=0)  # both in-plane flips, always
    item = build_item(p, flips, np.random.default_rng(0))
    assert np.array_equal(item["input"][IN_CHANNELS], p.extra["beam_plate"][::-1, ::-1])
    assert np.array_equal(item["input"][0], build_input(p)[0][::-1, ::-1])
    rotated = build_item(p, AugmentConfig(probability=1.0, flip=False, max_shift=0), np.random.default_rng(0))
    assert rotated["input"][IN_CHANNELS].min() >= 0  # background 0, not the CT's air


def test_patients_with_other_extra_inputs_or_bad_ones_are_refused(tmp_path):
    mixed = [synth_patient(0, 16, 0, beam_plates=True), synth_patient(1, 16, 0)]
    for p in mixed:
        p.attrs["split"] = "train"
    with pytest.raises(NasDoseError, match=r"x\.h5: patient pt_2 has extra input channels \[\], the patients before "
                                           r"it \['beam_plate'\]"):
        write_dataset(tmp_path / "x.h5", mixed, source="test", grid=16)
    assert not (tmp_path / "x.h5").exists()
    bad = replace(mixed[0], extra={"beam plate": mixed[0].extra["beam_plate"]})
    with pytest.raises(NasDoseError, match="extra input channel 'beam plate' needs a name of letters"):
        write_dataset(tmp_path / "y.h5", [bad], source="test", grid=16)
    nan = replace(mixed[0], extra={"beam_plate": np.full((16,) * 3, np.nan, np.float32)})
    with pytest.raises(NasDoseError, match="extra input 'beam_plate' holds NaN"):
        write_dataset(tmp_path / "z.h5", [nan], source="test", grid=16)


def test_a_patient_missing_its_extra_input_is_named_before_any_work(tmp_path):
    path = plated(tmp_path)
    with h5py.File(path, "a") as f:
        del f["patients/pt_3/extra"]
    with open_data(path) as data, pytest.raises(NasDoseError, match="patient pt_3: no extra input channels"):
        data.verify(data.ids())


def test_downsampling_averages_an_extra_input_over_each_block():
    p = synth_patient(0, 32, 0, beam_plates=True)
    coarse = downsample_patient(p, 2)
    plate = p.extra["beam_plate"].reshape(16, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(coarse.extra["beam_plate"], plate, rtol=1e-6)


def test_a_model_is_fitted_to_the_data_sets_channels_and_records_them():
    cfg = ModelConfig(kwargs={"widths": [4, 8]})
    plain = model_spec(cfg)
    assert "in_channels" not in plain["kwargs"] and "inputs" not in plain  # standard data: the spec as before
    spec = model_spec(cfg, extra=PLATE)
    assert spec["kwargs"]["in_channels"] == IN_CHANNELS + 1 and spec_inputs(spec) == PLATE
    assert data_channels(spec) == IN_CHANNELS + 1
    net = build_model(cfg, extra=PLATE)
    assert net(torch.zeros(1, IN_CHANNELS + 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)
    with pytest.raises(ConfigError, match=r"'model.kwargs.in_channels': 10, but the data set gives 11"):
        model_spec(ModelConfig(kwargs={"in_channels": IN_CHANNELS}), extra=PLATE)
    with pytest.raises(ConfigError, match="cascade's full-resolution stage takes the 10 standard input channels"):
        model_spec(cfg, refiner=True, extra=PLATE)
    assert data_channels(model_spec(cfg, refiner=True)) == IN_CHANNELS
    # a dose prior's autoencoder reads a dose: not fitted to the patient's channels
    prior = model_spec(ModelConfig(name="dose_autoencoder", kwargs={"widths": [4, 8]}), extra=PLATE)
    assert "in_channels" not in prior["kwargs"] and "inputs" not in prior


def test_a_genotype_is_searched_for_its_data_sets_channels(tmp_path):
    space = get_space("lenas")
    for channels in (IN_CHANNELS, IN_CHANNELS + 1):
        save_genotype(tmp_path / f"g{channels}.yaml",
                      space.sample(np.random.RandomState(0), {"stem": 4, "widths": [8], "in_channels": channels}))
    wide = ModelConfig(name="lenas", genotype=str(tmp_path / f"g{IN_CHANNELS + 1}.yaml"))
    assert spec_inputs(model_spec(wide, extra=PLATE)) == PLATE
    # on standard data one channel more is a cascade stage's genotype (its coarse dose)
    with pytest.raises(NasDoseError, match="a genotype searched for a cascade's full-resolution stage"):
        model_spec(wide)
    with pytest.raises(NasDoseError, match=r"g10\.yaml: searched for 10 input channels, but the data set gives 11"):
        model_spec(ModelConfig(name="lenas", genotype=str(tmp_path / "g10.yaml")), extra=PLATE)


def test_a_search_on_extra_inputs_widens_the_macro(tmp_path):
    path = plated(tmp_path)
    assert macro_channels(path, {}) == {"in_channels": IN_CHANNELS + 1}
    assert macro_channels(plated(tmp_path, plates=False, name="plain.h5"), {}) == {}
    with pytest.raises(ConfigError, match="'macro.in_channels': 10, but .* gives 11 input channels"):
        macro_channels(path, {"in_channels": IN_CHANNELS})


def test_a_trained_model_predicts_data_made_like_its_own_and_refuses_other(tmp_path):
    path = plated(tmp_path)
    cfg = load_config(TrainConfig, overrides=["model.kwargs.widths=[4, 8]", "epochs=1", "steps_per_epoch=2",
                                              "runtime.device=cpu", "runtime.threads=1"])
    train(cfg, TrainInputs(path), tmp_path / "run", official=False)
    assert trained_inputs(tmp_path / "run") == PLATE
    with open_data(path) as data:
        model = load_model_or_ensemble(tmp_path / "run", data.grid, data.extra_channels)
        assert model(torch.from_numpy(build_input(data.read("pt_1")))[None]).shape == (1, 1, 16, 16, 16)
    with pytest.raises(NasDoseError, match=r"run: the model takes the extra input channels \[beam_plate\], but the "
                                           r"data set has \[\]"):
        load_model_or_ensemble(tmp_path / "run", 16, ())
    # the same count of other channels is other data
    with pytest.raises(NasDoseError, match=r"has \[dose_bath\]"):
        load_model_or_ensemble(tmp_path / "run", 16, ("dose_bath",))
    predictor = nas_dose.load(tmp_path / "run", device="cpu", threads=1)
    assert predictor.predict(synth_patient(0, 16, 0, beam_plates=True)).shape == (16, 16, 16)
    with pytest.raises(NasDoseError, match=r"patient pt_1: .*run takes the extra input channels \[beam_plate\], "
                                           r"the patient has \[\]"):
        predictor.predict(synth_patient(0, 16, 0))
    info = export(ExportConfig(format="pt2", dynamic=False), ExportInputs(tmp_path / "run"), tmp_path / "exported")
    assert info["input"]["channels"][-1] == "beam_plate" and info["input"]["shape"][1] == IN_CHANNELS + 1
    assert "extra input volume" in info["input"]["scaling"]["beam_plate"]


def test_a_cascade_stage_refuses_extra_inputs(tmp_path):
    path = plated(tmp_path)
    with pytest.raises(NasDoseError, match=r"d\.h5: a cascade's full-resolution stage cannot take the extra input "
                                           r"channels \(beam_plate\)"):
        PatchDataset(path, "train", CascadeConfig(coarse="run", patch=8))


def test_hidden_channels_leave_the_input_and_are_put_back_in_place():
    seen, hidden = hidden_channels(("a_map", "beam_plate"), ("a_map",))
    assert seen == [*range(IN_CHANNELS), IN_CHANNELS + 1] and hidden == [IN_CHANNELS]
    x = torch.randn(2, IN_CHANNELS + 2, 4, 4, 4)
    assert torch.equal(unhide(x[:, seen], x[:, hidden], unhide_order(("a_map", "beam_plate"), ("a_map",))), x)


def test_a_data_set_hides_a_channel_moved_as_the_input_is(tmp_path):
    path = plated(tmp_path)
    flips = AugmentConfig(probability=1.0, max_shift=2)
    full = DoseDataset(path, "train", augment=flips, seed=3)
    hid = DoseDataset(path, "train", augment=flips, seed=3, hide=["beam_plate"])
    assert (hid.in_channels, hid.extra_inputs, full.in_channels) == (IN_CHANNELS, (), IN_CHANNELS + 1)
    a, b = full[1], hid[1]
    assert b["input"].shape[0] == IN_CHANNELS and b["hidden"].shape == (1, 16, 16, 16) and "hidden" not in a
    assert torch.equal(unhide(b["input"][None], b["hidden"][None], unhide_order(PLATE, PLATE))[0], a["input"])
    assert torch.equal(a["target"], b["target"])
    with pytest.raises(NasDoseError, match=r"d\.h5: cannot hide dose_bath: the extra input channels are "
                                           r"\[beam_plate\]"):
        DoseDataset(path, "train", hide=["dose_bath"])


def test_a_model_that_does_not_take_a_channel_predicts_data_that_has_it(tmp_path, capsys):
    path = plated(tmp_path)
    cfg = load_config(TrainConfig, overrides=["model.kwargs.widths=[4, 8]", "epochs=1", "steps_per_epoch=2",
                                              "runtime.device=cpu", "runtime.threads=1", "data.hide=[beam_plate]"])
    train(cfg, TrainInputs(path), tmp_path / "run", official=False)
    assert trained_inputs(tmp_path / "run") == ()
    assert data_channels(load_checkpoint(tmp_path / "run" / "best.pt")["model_config"]) == IN_CHANNELS
    assert cli.main(["predict", "--model", str(tmp_path / "run"), "--data", str(path), "--out",
                     str(tmp_path / "pred"), "-q"]) == 0
    with open_data(tmp_path / "pred" / "predictions.h5") as pred:
        assert len(pred.ids()) == 4
    # the plate is left out: a phantom is predicted the same with it and without it
    predictor = nas_dose.load(tmp_path / "run", device="cpu", threads=1)
    with_plate, without = synth_patient(0, 16, 0, beam_plates=True), synth_patient(0, 16, 0)
    assert np.array_equal(predictor.predict(with_plate), predictor.predict(without))
    with open_for(path, tmp_path / "run") as data:
        assert data.extra_channels == () and not data.read("pt_1").extra
