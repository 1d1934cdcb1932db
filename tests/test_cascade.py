"""The coarse-to-fine cascade: source-grid storage and scores, refiner, patches, windowed
inference, the train/predict path, the DVH-aware term, and full-resolution training steps."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nas_dose.cascade.patches import CascadeConfig, PatchDataset, refiner_input
from nas_dose.cascade.windows import predict_source, refine
from nas_dose.cli import main
from nas_dose.config import ConfigError
from nas_dose.data.dataset import CHANNELS, IN_CHANNELS, build_input
from nas_dose.data.openkbp import read_submission_csv
from nas_dose.data.patient import DOSE_SCALE_GY, Patient
from nas_dose.data.resample import downsample_patient, upsample_dose
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.io import load_yaml
from nas_dose.models import create_model, list_models
from nas_dose.models.refiner import REFINER_CHANNELS, Refiner
from nas_dose.scores import resampling_floor, score_on_source, score_patients
from nas_dose.training import DVHLossConfig
from nas_dose.training.losses import dvh_moment_loss, dvh_points, moments, structure_masks

FAST = ["epochs=2", "model.kwargs.widths=[4,8]", "data.augment.enabled=false", "runtime.device=cpu",
        "runtime.threads=1", "--quiet"]


@pytest.fixture(scope="module")
def coarse_data(tmp_path_factory) -> Path:
    """6 phantoms made at 32³ and stored at 16³ with their 32³ arrays (5 train, 1 validation)."""
    path = tmp_path_factory.mktemp("cascade") / "d16.h5"
    write_dataset(path, [downsample_patient(p, 2) for p in synth_patients(6, 32, seed=0)], source="synth32",
                  grid=16)
    return path


def test_resampling_floor_is_zero_for_block_constant_doses_and_none_when_not_resampled(tmp_path):
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 2:6, 2:6] = True
    dose = np.zeros((8, 8, 8), np.float32)
    dose[2:4, 2:6, 2:6], dose[4:6, 2:6, 2:6] = 30.0, 60.0  # constant on each 2³ block
    p = Patient("pt_1", np.zeros((8,) * 3, np.float32), mask, {"PTV70": mask.copy()}, (2.0, 2.0, 2.0), dose,
                {"split": "validation"})
    write_dataset(tmp_path / "c.h5", [downsample_patient(p, 2)], source="unit", grid=4)
    write_dataset(tmp_path / "f.h5", [p], source="unit", grid=8)
    with open_data(tmp_path / "c.h5") as coarse, open_data(tmp_path / "f.h5") as fine:
        floor = resampling_floor(coarse, ["pt_1"])
        # Trilinear upsampling blurs the step between the blocks: a floor above zero, and the
        # official scorer's number for exactly that upsampled dose.
        expected = score_patients([(p, coarse.to_source_grid("pt_1", coarse.read_dose("pt_1")))])
        assert floor.dose_score == pytest.approx(expected.dose_score) and floor.dose_score > 0
        assert resampling_floor(fine, ["pt_1"]) is None
        # A prediction of the reference itself on the source grid scores zero there.
        assert score_on_source(fine, [("pt_1", dose)]).dose_score == 0


def test_refiner_starts_from_the_coarse_dose():
    torch.manual_seed(0)
    refiner = Refiner(create_model("unet3d", in_channels=REFINER_CHANNELS, widths=(4, 8)))
    x = torch.rand(2, REFINER_CHANNELS, 16, 16, 16)
    assert torch.equal(refiner(x), x[:, -1:])
    with pytest.raises(Exception, match="ending in a convolution"):
        Refiner(nn.Identity())


class _Pointwise(nn.Module):
    """A network without spatial context: windowed inference must equal one whole forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(REFINER_CHANNELS, 1, 1)
        torch.manual_seed(1)
        nn.init.normal_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1:] + self.conv(x)


@pytest.mark.parametrize("window,overlap", [(8, 0.5), (12, 0.25), (32, 0.5)])
def test_windowed_refinement_equals_a_whole_volume_forward_for_a_pointwise_network(window, overlap):
    net = _Pointwise().eval()
    x = torch.rand(1, REFINER_CHANNELS, 20, 20, 20)
    with torch.no_grad():
        whole, windowed = net(x), refine(net, x, window, overlap)
    assert windowed.shape == whole.shape
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=1e-5)


def test_windows_without_mask_keep_the_coarse_dose():
    net = _Pointwise().eval()
    x = torch.rand(1, REFINER_CHANNELS, 16, 16, 16)
    mask = torch.zeros(16, 16, 16, dtype=torch.bool)
    mask[:4, :4, :4] = True
    with torch.no_grad():
        y = refine(net, x, 8, 0.5, mask)
    torch.testing.assert_close(y[0, 0, :4, :4, :4], net(x)[0, 0, :4, :4, :4], atol=1e-5, rtol=1e-5)
    assert torch.equal(y[0, 0, 12:, 12:, 12:], x[0, -1, 12:, 12:, 12:])


def test_refiner_tta_averages_the_patient_and_its_mirror_image():
    """A pointwise refiner sees each voxel alone, so its flips cancel but for the mirrored ones, in
    which the right parotid's channel carries the left parotid: half the flips see that."""
    net, patient = _Pointwise().eval(), next(iter(synth_patients(2, 32, seed=2)))
    nn.init.constant_(net.conv.bias, 1.0)  # a dose well above zero, which the clamp keeps
    mask = patient.possible_dose_mask
    assert patient.structures["RightParotid"].any() and patient.structures["LeftParotid"].any()
    coarse = patient.dose * 0.9
    plain, tta = (predict_source(net, patient, coarse, 1, CascadeConfig(patch=16), torch.device("cpu"), tta)
                  for tta in (False, True))
    x = torch.from_numpy(refiner_input(patient, np.where(mask, coarse, 0)))[None]
    right, left = CHANNELS.index("RightParotid"), CHANNELS.index("LeftParotid")
    order = list(range(x.shape[1]))
    order[right], order[left] = left, right
    with torch.no_grad():
        expected = [np.where(mask, np.maximum(y[0, 0].numpy() * DOSE_SCALE_GY, 0), 0)
                    for y in (net(x), (net(x) + net(x[:, order])) / 2)]
    np.testing.assert_allclose(plain, expected[0], atol=1e-3)
    np.testing.assert_allclose(tta, expected[1], atol=1e-3)
    assert np.abs(tta - plain).max() > 0.1


def test_patches_are_source_grid_boxes_with_the_coarse_dose_last(coarse_data):
    exact = CascadeConfig(coarse="unused", patch=16, blur=0.0, scale_error=0.0, noise_gy=0.0)
    ds = PatchDataset(coarse_data, "train", exact, seed=3)
    assert (len(ds), ds.grid, ds.in_channels, ds.factor) == (5, 16, REFINER_CHANNELS, 2)
    item = ds[(1, 5)]
    again = ds[(1, 5)]
    assert all(torch.equal(item[k], again[k]) for k in ("input", "target", "mask"))
    assert item["input"].shape == (REFINER_CHANNELS, 16, 16, 16) and item["target"].shape == (1, 16, 16, 16)
    with open_data(coarse_data) as d:
        pid = item["id"]
        full = d.read_source(pid)
        coarse_up = upsample_dose(d.read(pid).dose, 2) * full.possible_dose_mask
        x = build_input(full)
    # Find the box: the patch's input channels are a box of the whole source-grid input.
    found = [(a, b, c) for a in range(17) for b in range(17) for c in range(17)
             if np.array_equal(x[:, a:a + 16, b:b + 16, c:c + 16], item["input"][:IN_CHANNELS].numpy())]
    assert len(found) >= 1
    a, b, c = found[0]
    box = (slice(a, a + 16), slice(b, b + 16), slice(c, c + 16))
    np.testing.assert_allclose(item["input"][-1].numpy() * DOSE_SCALE_GY, coarse_up[box], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(item["target"][0].numpy() * DOSE_SCALE_GY, full.dose[box] * full.possible_dose_mask[box],
                               rtol=1e-6, atol=1e-4)
    noisy = PatchDataset(coarse_data, "train", CascadeConfig(coarse="unused", patch=16), seed=3)[(1, 5)]
    assert not torch.equal(noisy["input"][-1], item["input"][-1])  # the degraded reference differs


def test_fixed_patches_do_not_change_with_the_epoch(coarse_data):
    ds = PatchDataset(coarse_data, "train", CascadeConfig(coarse="unused", patch=16, val_patches=2), fixed=True)
    assert len(ds) == 10
    assert torch.equal(ds[(3, 0)]["input"], ds[(3, 7)]["input"])


def nasdose(*argv: object) -> int:
    return main([str(a) for a in argv])


def test_cascade_trains_and_predicts_on_the_source_grid(coarse_data, tmp_path, monkeypatch):
    coarse, refiner, pred = tmp_path / "coarse", tmp_path / "refiner", tmp_path / "pred"
    assert nasdose("train", "--data", coarse_data, "--out", coarse, *FAST) == 0
    monkeypatch.chdir(tmp_path)  # the coarse stage given relative to the working directory ...
    assert nasdose("train", "--data", coarse_data, "--out", refiner, *FAST, "cascade.coarse=coarse",
                   "cascade.patch=16", "dvh_loss.weight=0.5") == 0
    assert load_yaml(refiner / "config.yaml")["cascade"]["coarse"] == str(coarse.resolve())
    monkeypatch.chdir(coarse_data.parent)  # ... is recorded absolute: found from another one
    assert nasdose("predict", "--model", refiner, "--data", coarse_data, "--out", pred, "--split", "validation",
                   "runtime.device=cpu", "--quiet") == 0
    with open_data(coarse_data) as d, open_data(pred / "predictions.h5") as p:
        assert p.grid == 32 and p.ids() == d.ids("validation")
        pid = p.ids()[0]
        dose = p.read_dose(pid)
        mask = d.source_mask(pid)
        assert dose.shape == (32, 32, 32) and not dose[~mask].any() and dose[mask].any()
        assert p.patient_attrs(pid)["voxel_mm"] == list(d.read_source(pid).voxel_mm)  # the 32³ grid's
        np.testing.assert_array_equal(read_submission_csv(pred / "submission" / f"{pid}.csv", (32, 32, 32)), dose)


def test_moments_and_the_dvh_term():
    x = torch.zeros(1, IN_CHANNELS, 4, 4, 4)
    x[0, 1, :2] = 1.0          # PTV70 in the first half
    x[0, 1, 2:3] = 0.8         # PTV56 in one slab
    x[0, 2, 3] = 1.0           # Brainstem, the last slab
    masks = structure_masks(x)
    assert masks.shape == (1, 10, 4, 4, 4)
    assert masks[0, 0].sum() == 16 and masks[0, 9].sum() == 32  # Brainstem; PTV70
    assert masks[0, 7].sum() == 48 and masks[0, 8].sum() == 32  # >= 56 Gy level; >= 63 Gy level
    dose = torch.rand(1, 1, 4, 4, 4)
    m = moments(dose, masks, (1.0, 2.0))
    assert m[0, 0, 0] == pytest.approx(dose[0, 0, 3].mean().item(), rel=1e-5)
    assert m[0, 0, 1] == pytest.approx(dose[0, 0, 3].square().mean().sqrt().item(), rel=1e-5)
    cfg = DVHLossConfig(weight=1.0, powers=(1.0, 2.0, 10.0), min_voxels=1)
    assert dvh_moment_loss(dose, dose, x, cfg) == pytest.approx(0.0, abs=1e-6)
    dose[0, 0, 3] = 0.5        # a uniform brainstem dose: every moment of it is 0.5
    hotter = dose.clone()
    hotter[0, 0, 3] = 0.6      # only the brainstem changes: its 3 moments rise by 0.1 each
    loss = dvh_moment_loss(hotter, dose, x, cfg)
    assert loss.item() == pytest.approx(3 * 0.1 / (4 * 3), rel=1e-3)  # 4 structures present x 3 orders
    hotter.requires_grad_(True)
    dvh_moment_loss(hotter, dose, x, cfg).backward()
    assert hotter.grad[0, 0, 3].abs().sum() > 0 and hotter.grad[0, 0, :3].abs().sum() == 0



def test_dvh_points_are_the_scores_percentiles():
    gen = torch.Generator().manual_seed(3)
    dose, mask = torch.rand(6, 6, 6, generator=gen), torch.rand(6, 6, 6, generator=gen) > 0.3
    masks = torch.stack([mask, torch.zeros_like(mask)]).float()[None]  # the second structure is empty
    points = dvh_points(dose[None], masks, (99.0, 95.0, 1.0))
    expected = np.percentile(dose[mask].numpy(), [1, 5, 99])  # D99, D95, D1 as the evaluator takes them
    assert points[0, 0].numpy() == pytest.approx(expected, rel=1e-5)
    assert points[0, 1].tolist() == [0.0, 0.0, 0.0]


def test_target_points_catch_a_cold_target_edge_that_the_moments_barely_see():
    x = torch.zeros(1, IN_CHANNELS, 4, 4, 4)
    x[0, 1] = 1.0              # one PTV70 over the whole cube: 64 voxels in each target region
    dose = torch.full((1, 1, 4, 4, 4), 1.0)
    cold = dose.clone()
    cold[0, 0, 0, 0, :] = 0.5  # 4 of 64 voxels (6 %) under-dosed
    moments_only = DVHLossConfig(weight=1.0, powers=(1.0, 2.0, 10.0), min_voxels=1)
    points_only = DVHLossConfig(weight=1.0, powers=(), target_points=(99.0, 95.0, 1.0), min_voxels=1)
    both = DVHLossConfig(weight=1.0, powers=(1.0, 2.0, 10.0), target_points=(99.0, 95.0, 1.0), min_voxels=1)
    m, q, b = (dvh_moment_loss(cold, dose, x, c).item() for c in (moments_only, points_only, both))
    assert m == pytest.approx((1 - 0.96875 + 1 - 0.953125 ** 0.5 + 1 - (0.9375 + 4 * 0.5 ** 10 / 64) ** 0.1) / 3,
                              rel=1e-4)  # the mean falls by 1/32 and the other moments by less
    # D99 (quantile position 0.63 of 0..63) falls to 0.5, D95 (position 3.15) to 0.575, D1 not at all
    assert q == pytest.approx((0.5 + 0.425 + 0.0) / 3, rel=1e-5)
    assert b == pytest.approx((m + q) / 2, rel=1e-5)  # 3 targets x 3 orders beside 3 targets x 3 points
    cold.requires_grad_(True)
    dvh_moment_loss(cold, dose, x, points_only).backward()
    assert cold.grad[0, 0, 0, 0].abs().sum() > 0  # the cold voxels are pulled up


def test_target_points_are_validated():
    for bad, match in (({"target_points": (0.0,)}, "percentages"), ({"target_points": (100.0,)}, "percentages"),
                       ({"powers": ()}, "not both empty"),
                       ({"target_points": (95.0,), "target_weight": 0.0}, "target_weight")):
        with pytest.raises(ConfigError, match=match):
            DVHLossConfig(**bad).validate()
    DVHLossConfig(powers=(), target_points=(99.0,)).validate()

@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_a_full_resolution_training_step_of_every_reference_model(name):
    """One step at the OpenKBP source grid (128³, batch 1) on the CPU: the path a GPU run takes."""
    torch.manual_seed(0)
    model = create_model(name)
    x, target = torch.rand(1, IN_CHANNELS, 128, 128, 128), torch.rand(1, 1, 128, 128, 128)
    loss = (model(x) - target).abs().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_a_full_resolution_training_step_of_a_lenas_size_genotype():
    from nas_dose.search_spaces import build_model, get_space

    space = get_space("lenas")
    torch.manual_seed(0)
    model = build_model(space.sample(np.random.RandomState(0)))
    x = torch.rand(1, IN_CHANNELS, 128, 128, 128)
    loss = model(x).abs().mean()
    loss.backward()
    assert torch.isfinite(loss) and sum(p.numel() for p in model.parameters()) > 100_000


def test_recipes_load_and_a_cascade_pipeline_runs(coarse_data, tmp_path, capsys):
    from nas_dose.config import layered
    from nas_dose.distill.distill import DistillConfig
    from nas_dose.ensemble import EnsembleConfig
    from nas_dose.predict import Config as PredictConfig
    from nas_dose.recipe import load_recipe
    from nas_dose.strategies.search import SearchConfig
    from nas_dose.training import TrainConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    cpu, gpu = load_recipe(configs / "openkbp_cpu.yaml"), load_recipe(configs / "openkbp_gpu.yaml")
    assert cpu.stages == ["train", "folds", "cascade"] and cpu.grid == 32 and gpu.grid == 128
    assert cpu.predict == {"tta": True}
    for r in (cpu, gpu):  # every section is a valid config of its stage
        for name, cls in [("train", TrainConfig), ("cascade", TrainConfig), ("search", SearchConfig),
                          ("ensemble", EnsembleConfig), ("distill", DistillConfig), ("predict", PredictConfig)]:
            layered(cls, {"cascade": {"coarse": "x"}} if name == "cascade" else {}, getattr(r, name), name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages: [train, cascade]\ncoarse: unet3d\npredict: {tta: true}\n")
    out = tmp_path / "pipe"
    capsys.readouterr()
    assert nasdose("pipeline", "--out", out, "--data", coarse_data, "--config", recipe, "--quick") == 0
    report = capsys.readouterr().out
    assert "32³ source grid" in report and "resampling floor" in report and "cascade" in report
    with open_data(out / "predict" / "cascade" / "predictions.h5") as p:
        assert p.grid == 32
    assert load_yaml(out / "predict" / "cascade" / "config.yaml")["tta"] is True  # the recipe's predict section
    assert (out / "evaluate" / "cascade" / "metrics.json").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [cascade]\n")
    assert nasdose("pipeline", "--out", tmp_path / "pipe2", "--data", coarse_data, "--config", bad, "--quick") == 1
    assert "needs the 'train' stage" in capsys.readouterr().err


def test_folds_leave_out_every_kth_training_patient_and_feed_a_cascade(coarse_data, tmp_path):
    from nas_dose.config import load_config
    from nas_dose.training import DataConfig, Objective, TrainConfig

    ids = [f"pt_{i}" for i in range(7)]
    assert DataConfig(folds=3, fold=1).held_out(ids) == ["pt_1", "pt_4"] and DataConfig().held_out(ids) == []
    with open_data(coarse_data) as d:
        train = d.ids("train")
    config = load_config(TrainConfig, overrides=["data.folds=2", "data.fold=1"])
    assert Objective().train_set(coarse_data, config).ids == [train[0], train[2], train[4]]
    fold = tmp_path / "fold0"
    assert nasdose("train", "--data", coarse_data, "--out", fold, *FAST, "data.folds=2", "data.fold=0") == 0
    # Coarse predictions from a file (here those of the fold model for every training patient).
    pred = tmp_path / "pred"
    assert nasdose("predict", "--model", fold, "--data", coarse_data, "--out", pred, "--split", "train",
                   "--no-csv", "--quiet") == 0
    common = [*FAST, f"cascade.coarse={fold}", "cascade.patch=16", "cascade.coarse_input=predictions"]
    assert nasdose("train", "--data", coarse_data, "--out", tmp_path / "r", *common,
                   f"cascade.coarse_predictions={pred / 'predictions.h5'}") == 0
    assert nasdose("train", "--data", coarse_data, "--out", tmp_path / "r2", *common) == 1  # no file named


def test_a_pipeline_cascade_learns_from_out_of_fold_predictions(coarse_data, tmp_path):
    from nas_dose.config import load_config
    from nas_dose.training import TrainConfig

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages: [train, folds, cascade]\nfolds: 2\n")
    out = tmp_path / "pipe"
    assert nasdose("pipeline", "--out", out, "--data", coarse_data, "--config", recipe, "--quick") == 0
    with open_data(coarse_data) as d, open_data(out / "folds" / "out_of_fold.h5") as oof:
        train = d.ids("train")
        assert sorted(oof.ids()) == sorted(train)
        # each training patient predicted by the fold run that did not train on it
        fold1 = load_config(TrainConfig, out / "folds" / "fold1" / "config.yaml")
        assert (fold1.data.folds, fold1.data.fold) == (2, 1) and fold1.data.held_out(train) == train[1::2]
    cascade = load_config(TrainConfig, out / "cascade" / "config.yaml").cascade
    assert cascade.coarse_input == "predictions" and cascade.coarse_predictions.endswith("out_of_fold.h5")


@pytest.fixture(scope="module")
def stage_ensemble(coarse_data, tmp_path_factory) -> tuple[Path, dict]:
    """`nasdose ensemble` with `train.cascade.coarse`: two pool members trained as full-resolution
    stages refining one coarse U-Net (one epoch of two 16³ patches each)."""
    from nas_dose import ensemble
    from nas_dose.config import load_config
    from nas_dose.pool import MATRICES, Pool, PoolMember, save_pool
    from nas_dose.search_spaces import get_space

    tmp_path = tmp_path_factory.mktemp("stages")
    coarse = tmp_path / "coarse"
    assert nasdose("train", "--data", coarse_data, "--out", coarse, *FAST) == 0
    space = get_space("lenas")
    a = {"down.op1": "conv", "down.op2": "identity", "down.connect": "identity", "down.down": "max_pool",
         "up.op1": "conv", "up.op2": "identity", "up.connect": "identity", "up.up": "up_interpolate"}
    choices = [a, {**a, "down.op1": "dep_conv", "up.up": "up_conv"}]
    members = [PoolMember(f"m{i}", space.genotype(c, {"stem": 4, "widths": [8, 8]}), 1.0)
               for i, c in enumerate(choices)]
    save_pool(tmp_path / "pool.yaml", Pool("lenas", "hand", 0, members, {k: np.zeros((2, 2)) for k in MATRICES}))
    cfg = load_config(ensemble.Config, overrides=[
        f"train.cascade.coarse={coarse}", "train.cascade.patch=16", "train.epochs=1", "train.steps_per_epoch=2",
        "train.data.augment.enabled=false", "runtime.device=cpu", "runtime.threads=1", "plots=1",
        "selection.combination=weighted"])
    out = tmp_path / "ens"
    return out, ensemble.run(cfg, ensemble.Inputs(tmp_path / "pool.yaml", coarse_data), out)


def test_an_ensemble_of_full_resolution_stages(coarse_data, stage_ensemble):
    """Selection and scores are on the source grid, and ensemble.yaml predicts as a cascade whose
    stage is the weighted mean of the members'."""
    from nas_dose.inference import Cascade, Ensemble, load_predictor
    from nas_dose.runtime import Runtime, RuntimeConfig

    out, metrics = stage_ensemble
    runtime = Runtime(RuntimeConfig(device="cpu", threads=1))
    with open_data(coarse_data) as d:
        predictor = load_predictor(out / "ensemble.yaml", runtime, d.grid)
        assert isinstance(predictor, Cascade) and isinstance(predictor.refiner, Ensemble)
        pid = d.ids("validation")[0]
        (_, dose), = predictor.predict(d, [pid], runtime)
        mean = 0
        for name, w in metrics["ensemble"]["weights"].items():
            with open_data(out / "members" / name / "validation.h5") as member:
                mean = mean + w * member.read_dose(pid)
        assert dose.shape == (32, 32, 32)
        np.testing.assert_allclose(dose, mean, atol=2e-4)
        official = score_patients([(d.read_source(pid), dose)])
    assert metrics["validation_in_sample"]["dose_score"] == pytest.approx(official.dose_score, abs=1e-4)


def test_an_ensemble_records_its_coarse_stage_absolute_and_resumes_a_relative_record(
        coarse_data, stage_ensemble, tmp_path, monkeypatch):
    """`train.cascade.coarse` is taken from the working directory and recorded absolute, so the
    run resumes from anywhere; a run recorded with the path as given resumes where it names the
    same stage."""
    from nas_dose import ensemble
    from nas_dose.config import load_config, save_config

    out, metrics = stage_ensemble
    cfg = load_config(ensemble.Config, out / "config.yaml")
    coarse = Path(cfg.train.cascade.coarse)
    monkeypatch.chdir(coarse.parent)
    relative = replace(cfg, train=replace(cfg.train, cascade=replace(cfg.train.cascade, coarse=coarse.name)))
    resumed = tmp_path / "ens"
    shutil.copytree(out, resumed)
    save_config(resumed / "config.yaml", relative)  # as releases before this one recorded it
    again = ensemble.run(relative, ensemble.Inputs(out.parent / "pool.yaml", coarse_data), resumed, resume=True)
    assert load_config(ensemble.Config, resumed / "config.yaml").train.cascade.coarse == str(coarse)
    assert again["ensemble"]["weights"] == metrics["ensemble"]["weights"]


def test_distilling_an_ensemble_of_full_resolution_stages(coarse_data, stage_ensemble, tmp_path):
    """The student (and its baseline) is a full-resolution stage refining the same coarse model,
    taught on patches by the teacher's source-grid doses; its row is its cascade's official score."""
    from nas_dose.config import load_config
    from nas_dose.distill import distill
    from nas_dose.inference import Cascade, load_predictor, official_scores
    from nas_dose.models.factory import load_model
    from nas_dose.runtime import Runtime, RuntimeConfig

    teacher = stage_ensemble[0] / "ensemble.yaml"
    cfg = load_config(distill.Config, overrides=[
        "student=unet3d:widths=4,8", "train.epochs=1", "train.steps_per_epoch=2", "train.data.augment.enabled=false",
        "runtime.device=cpu", "runtime.threads=1", "latency.size=16", "latency.runs=1"])
    out = tmp_path / "distill"
    metrics = distill.run(cfg, distill.Inputs(teacher, coarse_data), out)
    for run in ("student", "baseline"):
        assert isinstance(load_model(out / run)[0], Refiner)
    with open_data(out / "teacher.h5") as cache:
        assert cache.grid == 32
    runtime = Runtime(RuntimeConfig(device="cpu", threads=1))
    with open_data(coarse_data) as d:
        student = load_predictor(out / "student", runtime, d.grid)
        assert isinstance(student, Cascade)
        official = official_scores(student, d, d.ids("validation"), runtime)
    assert metrics["rows"][0]["dose_score"] == pytest.approx(official.dose_score, abs=1e-4)
    assert "full-resolution stage" in (out / "comparison.md").read_text()


def test_the_python_api_predicts_a_patient_on_its_own_grid(coarse_data, tmp_path):
    """DosePredictor: a source-grid patient (or its npz file) in, its dose in Gy on that grid out,
    equal to what `nasdose predict` writes, for a coarse model and for a cascade."""
    from nas_dose.api import DosePredictor
    from nas_dose.inference import load_predictor, predict_patients
    from nas_dose.runtime import Runtime, RuntimeConfig

    coarse, refiner = tmp_path / "coarse", tmp_path / "refiner"
    assert nasdose("train", "--data", coarse_data, "--out", coarse, *FAST) == 0
    assert nasdose("train", "--data", coarse_data, "--out", refiner, *FAST, f"cascade.coarse={coarse}",
                   "cascade.patch=16") == 0
    patient = next(p for p in synth_patients(6, 32, seed=0) if p.attrs["split"] == "validation")
    runtime = Runtime(RuntimeConfig(device="cpu", threads=1))
    with open_data(coarse_data) as d:
        (_, low), = predict_patients(load_predictor(coarse, runtime, d.grid), d, [patient.id], runtime)
        expected_coarse = d.to_source_grid(patient.id, low)
        (_, expected_cascade), = load_predictor(refiner, runtime, d.grid).predict(d, [patient.id], runtime)
    np.testing.assert_allclose(DosePredictor(coarse, device="cpu").predict(patient), expected_coarse, atol=1e-5)
    npz = tmp_path / f"{patient.id}.npz"
    np.savez_compressed(npz, ct=patient.ct, dose=patient.dose, possible_dose_mask=patient.possible_dose_mask,
                        voxel_dimensions_mm=np.array(patient.voxel_mm, np.float32), **patient.structures)
    dose = DosePredictor(refiner, device="cpu").predict(npz)
    assert dose.shape == (32, 32, 32) and not dose[~patient.possible_dose_mask].any()
    np.testing.assert_allclose(dose, expected_cascade, atol=1e-4)
