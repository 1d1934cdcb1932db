import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nas_dose.config import ConfigError, load_config, to_dict
from nas_dose.data.dataset import DoseDataset, item_bytes, make_loader
from nas_dose.data.store import open_data
from nas_dose.errors import NasDoseError
from nas_dose.io import load_checkpoint, load_yaml
from nas_dose.models.factory import CHECKPOINT_FORMAT, build_model, load_model
from nas_dose.runtime import Runtime, RuntimeConfig, seed_everything
from nas_dose.scores import dose_error
from nas_dose.training import TrainConfig, dose_errors_gy, masked_loss, train_model, validate
from nas_dose.training.checkpoints import check_resumable
from nas_dose.training.engine import _Trainer
from nas_dose.training.optimization import lr_factor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# A tiny U-Net on one thread (tiny convolutions only lose from a second, shared core).
SMALL = ["model.kwargs.widths=[4, 8, 16]", "runtime.device=cpu", "runtime.threads=1", "log_every=2",
         "optim.lr=0.003"]


def config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, overrides=[*SMALL, *overrides])


def fresh(cfg: TrainConfig) -> nn.Module:
    seed_everything(cfg.seed)
    return build_model(cfg.model)


def val_scores(history: list[dict]) -> dict[int, float]:
    return {h["epoch"]: h["val_dose_score"] for h in history if h["val_dose_score"] is not None}


class Constant(nn.Module):
    """Predicts `value` (dose / 70) everywhere."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], self.value)


def test_training_reduces_the_loss_and_the_validation_score(data):
    cfg = config("epochs=8", "data.batch_size=1", "data.augment.enabled=false", "optim.lr=0.01",
                 "model.kwargs.widths=[8, 16, 32]", "log_every=6")
    result = train_model(fresh(cfg), cfg, data)
    losses = [h["loss"] for h in result.history]
    vals = list(val_scores(result.history).values())
    assert result.steps == 48 and result.epochs == 8 and len(vals) == 8
    assert losses[-1] < 0.7 * losses[0]
    assert vals[-1] < vals[0]
    assert result.best_val_score == min(vals) < result.zero_val_score


def test_validation_score_is_the_official_dose_score_on_the_validation_split(data):
    loader = make_loader(DoseDataset(data, "validation"), batch_size=2, shuffle=False)
    score, zero = validate(Constant(0.5), loader, Runtime(RuntimeConfig(device="cpu")))
    with open_data(data) as f:
        patients = [f.read(pid) for pid in f.ids("validation")]
    assert len(patients) == 2
    # What `nasdose predict` writes for a constant 35 Gy: 35 Gy inside the mask, 0 outside.
    expected = np.mean([dose_error(np.where(p.possible_dose_mask, 35.0, 0.0), p.dose, p.possible_dose_mask)
                        for p in patients])
    expected_zero = np.mean([dose_error(np.zeros_like(p.dose), p.dose, p.possible_dose_mask)
                             for p in patients])
    assert score == pytest.approx(expected, rel=1e-5)
    assert zero == pytest.approx(expected_zero, rel=1e-5)
    assert score != pytest.approx(zero, rel=1e-2)


def test_masked_loss_and_dose_errors_by_hand():
    pred = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(1, 1, 1, 1, 4)
    target = torch.tensor([0.25, 0.0, 1.0, 0.5]).reshape(1, 1, 1, 1, 4)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 1, 1, 4)
    assert masked_loss(pred, target, mask).item() == pytest.approx((0.25 + 1.0) / 2)
    assert masked_loss(pred, target, mask, "mse").item() == pytest.approx((0.0625 + 1.0) / 2)
    # Clamped at 0 and zeroed outside the mask: |0.5-0.25| + 0 + |0-1| + |0-0.5|, per mask voxel.
    assert dose_errors_gy(pred, target, mask).item() == pytest.approx((0.25 + 1.0 + 0.5) / 2 * 70)


def test_schedules():
    cosine = load_config(TrainConfig, overrides=["schedule.warmup_steps=2"]).schedule
    assert [lr_factor(cosine, s, 12, 3) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(cosine, 2, 12, 3) == pytest.approx(1.0)
    assert lr_factor(cosine, 7, 12, 3) == pytest.approx(0.5)
    assert lr_factor(cosine, 12, 12, 3) == pytest.approx(0.0)
    step = load_config(TrainConfig, overrides=["schedule.name=step", "schedule.step_epochs=2"]).schedule
    assert [lr_factor(step, s, 100, 3) for s in (0, 5, 6, 12)] == [1.0, 1.0, 0.5, 0.25]


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    def hook(done: int) -> None:
        if done == step:
            raise Interrupt

    return hook


@pytest.mark.parametrize("stop_at, checkpointed_at", [(6, 6), (5, 4)],
                         ids=["after-2-epochs", "mid-epoch"])
def test_resume_continues_exactly(data, tmp_path, stop_at, checkpointed_at):
    # Dropout and augmentation on: the torch RNG and the data stream must both resume exactly.
    cfg = config("epochs=4", "checkpoint_every=2", "model.kwargs.dropout=0.2")
    whole = fresh(cfg)
    expected = train_model(whole, cfg, data, tmp_path / "whole")

    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_model(fresh(cfg), cfg, data, run, on_step=interrupt_at(stop_at))
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]) == (checkpointed_at, checkpointed_at // 3,
                                                                  checkpointed_at % 3)
    seed_everything(99)
    resumed_model = build_model(cfg.model)  # another initialization: the checkpoint replaces it
    resumed = train_model(resumed_model, cfg, data, run, resume=True)

    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    for key, value in expected.best_state.items():
        assert torch.equal(value, resumed.best_state[key]), key

    def strip(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if k not in ("seconds", "val_seconds", "data_wait_s")} for e in history]

    assert strip(resumed.history) == strip(expected.history)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert strip(log) == strip(expected.history)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["best_val_dose_score"] == expected.best_val_score


def test_resuming_with_another_config_names_the_keys(data, tmp_path):
    cfg = config("epochs=1")
    train_model(fresh(cfg), cfg, data, tmp_path / "run")
    other = config("epochs=1", "optim.lr=0.001", "data.batch_size=1")
    with pytest.raises(NasDoseError, match=r"last.pt: .*different config \(data.batch_size, optim.lr\)"):
        train_model(fresh(other), other, data, tmp_path / "run", resume=True)


def test_a_run_recorded_with_a_relative_coarse_path_resumes_from_the_same_directory(tmp_path, monkeypatch):
    """nasdose train records cascade.coarse absolute (CascadeConfig.resolved); a run recorded
    before, with the path as given, resumes where that path still names the same coarse stage."""
    monkeypatch.chdir(tmp_path)
    cfg = config("cascade.coarse=coarse")
    ckpt = {"format": CHECKPOINT_FORMAT, "optimizer": {}, "config": to_dict(cfg)}
    check_resumable(ckpt, replace(cfg, cascade=cfg.cascade.resolved()), tmp_path / "last.pt")
    other = config(f"cascade.coarse={tmp_path / 'other'}")
    with pytest.raises(NasDoseError, match=r"last.pt: .*different config \(cascade.coarse\)"):
        check_resumable(ckpt, other, tmp_path / "last.pt")

def test_existing_run_needs_resume(data, tmp_path):
    cfg = config("epochs=1")
    train_model(fresh(cfg), cfg, data, tmp_path / "run")
    with pytest.raises(NasDoseError, match="--resume"):
        train_model(fresh(cfg), cfg, data, tmp_path / "run")


def test_early_stopping_stops_after_patience_epochs_without_improvement(data, tmp_path):
    # A learning rate far below float32 resolution: the weights, hence the score, never change.
    cfg = config("epochs=10", "patience=2", "optim.lr=1.0e-30")
    result = train_model(fresh(cfg), cfg, data, tmp_path / "run")
    assert result.stopped_early and result.best_epoch == 1
    assert result.epochs == 3 and result.steps == 9
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stopped_early"] is True and metrics["epochs"] == 3


def test_best_checkpoint_is_chosen_on_validation(data, tmp_path):
    cfg = config("epochs=4", "data.augment.enabled=false")
    model = fresh(cfg)

    def spoil_after_epoch_2(step: int) -> None:
        if step == 6:  # epoch 2 is validated and saved; from now on predictions are ~700 Gy too high
            with torch.no_grad():
                model.head.bias += 10.0

    result = train_model(model, cfg, data, tmp_path / "run", on_step=spoil_after_epoch_2)
    vals = val_scores(result.history)
    assert result.best_epoch == 2 == min(vals, key=vals.get)
    assert vals[3] > vals[2] and vals[4] > vals[2]
    best, meta = load_model(tmp_path / "run")
    assert meta["epoch"] == 2 and meta["val_dose_score"] == vals[2]
    for key, value in result.best_state.items():
        assert torch.equal(best.state_dict()[key], value)
    assert not torch.equal(best.head.bias, model.head.bias)
    loader = make_loader(DoseDataset(data, "validation"), batch_size=2, shuffle=False)
    assert validate(best, loader, Runtime(RuntimeConfig(device="cpu")))[0] == pytest.approx(vals[2], rel=1e-6)


def test_run_folder_files(data, tmp_path):
    cfg = config("epochs=2")
    model = fresh(cfg)
    train_model(model, cfg, data, tmp_path / "run")
    run = tmp_path / "run"
    assert load_config(TrainConfig, run / "config.yaml") == cfg
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 3, 4, 6]
    assert set(log[0]) == {"step", "epoch", "loss", "lr", "val_dose_score", "seconds"}
    # an epoch's end also says how long its validation took and the steps waited for data
    assert set(log[1]) == set(log[0]) | {"val_seconds", "data_wait_s"}
    assert 0 < log[1]["val_seconds"] < log[1]["seconds"] and 0 < log[1]["data_wait_s"] < log[1]["seconds"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["runtime"]["device"] == "cpu" and metrics["runtime"]["threads"] == 1
    assert metrics["peak_memory"]["kind"] == "process_max_rss" and metrics["peak_memory"]["bytes"] > 0
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "progress", "best_model"} <= set(last)


def test_peak_memory_is_returned(data):
    cfg = config("epochs=1")
    peak = train_model(fresh(cfg), cfg, data).peak_memory
    assert peak["kind"] == "process_max_rss" and peak["bytes"] > 0


def test_out_of_memory_in_the_first_step_is_a_user_error_before_any_checkpoint(data, tmp_path):
    cfg = config("epochs=1")
    model = fresh(cfg)

    def too_big(x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "meta":  # the shape check before the run folder: no memory used
            return x[:, :1]
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    model.forward = too_big
    with pytest.raises(NasDoseError, match=r"^training does not fit in memory: batch 2 at grid 16³ needs more "
                                           r"than the .* free on cpu \(try data.batch_size=1, a smaller model\)$"):
        train_model(model, cfg, data, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "best.pt").exists()


def test_a_network_too_deep_for_the_grid_fails_before_the_run_folder_is_written(data, tmp_path):
    cfg = config("model.kwargs.widths=[4, 8, 16, 32, 64]")  # 16³ halved four times: 1 voxel
    with pytest.raises(NasDoseError, match=r"16x16x16 voxels is too small for 5 levels"):
        train_model(fresh(cfg), cfg, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_loader_workers_default_to_auto_which_is_0_on_cpu(data):
    cfg = config("epochs=1")
    assert cfg.data.num_workers is None
    trainer = _Trainer(fresh(cfg), cfg, data, None, False, None)
    assert trainer.train_loader.num_workers == 0 and trainer.val_loader.num_workers == 0
    explicit = config("epochs=1", "data.num_workers=1")
    assert _Trainer(fresh(explicit), explicit, data, None, False, None).train_loader.num_workers == 1


def test_loader_workers_are_cut_to_what_shared_memory_holds(data, monkeypatch, capsys):
    from nas_dose.training import engine

    # each worker keeps 2 batches of 2 items ready; a fifth of the free space is kept spare
    per_worker = 2 * 2 * item_bytes(DoseDataset(data, "train"))
    assert per_worker == 4 * (12 * 16 ** 3 * 4 + 4)  # 10 input channels, target and mask at 16³; labeled
    cfg = config("epochs=1", "data.num_workers=2")
    monkeypatch.setattr(engine, "shared_memory_free", lambda: int(1.1 * per_worker / 0.8))
    assert _Trainer(fresh(cfg), cfg, data, None, False, None).train_loader.num_workers == 1
    assert "data.num_workers: 1 instead of 2: /dev/shm has 1 MiB free and each worker holds 0.8 MiB" \
        in capsys.readouterr().out
    monkeypatch.setattr(engine, "shared_memory_free", lambda: int(0.9 * per_worker / 0.8))
    trainer = _Trainer(fresh(cfg), cfg, data, None, False, None)
    assert trainer.train_loader.num_workers == 0 and trainer.val_loader.num_workers == 0
    monkeypatch.setattr(engine, "shared_memory_free", lambda: None)  # no /dev/shm: as asked
    assert _Trainer(fresh(cfg), cfg, data, None, False, None).train_loader.num_workers == 2
    # under torchrun each of the node's processes has its share of /dev/shm, and the line says so
    monkeypatch.setattr(engine.distributed, "local_world_size", lambda: 2)
    monkeypatch.setattr(engine, "shared_memory_free", lambda: int(2 * 1.1 * per_worker / 0.8))
    assert _Trainer(fresh(cfg), cfg, data, None, False, None).train_loader.num_workers == 1
    assert "/dev/shm has 1 MiB free for each of the node's 2 processes and each worker" in capsys.readouterr().out


def test_load_model_round_trip(data, tmp_path):
    cfg = config("epochs=1")
    model = fresh(cfg)
    result = train_model(model, cfg, data, tmp_path / "run")
    x = torch.rand(1, 10, 16, 16, 16)
    best, meta = load_model(tmp_path / "run")
    assert meta["model_config"] == {"name": "unet3d", "kwargs": {"widths": [4, 8, 16]}, "genotype": None,
                                   "refiner": False}
    reference = build_model(cfg.model).eval()
    reference.load_state_dict(result.best_state)
    with torch.no_grad():
        assert torch.equal(best(x), reference(x))
        last, _ = load_model(tmp_path / "run" / "checkpoints" / "last.pt")
        assert torch.equal(last(x), model.eval()(x))


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(NasDoseError, match="no best.pt"):
        load_model(tmp_path)
    truncated = tmp_path / "cut.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(NasDoseError, match="cut.pt: not a readable checkpoint"):
        load_model(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(NasDoseError, match="foreign.pt: not a nasdose model checkpoint"):
        load_model(foreign)


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.nme=adam", "optim.nme"),
    ("data.batch_size=0", "data.batch_size"),
    ("schedule.name=linear", "schedule.name"),
    ("patience=0", "patience"),
    ("runtime.amp=fp8", "runtime.amp"),
    ("data.augment.probability=2", "probability"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TrainConfig, overrides=[override])


def test_model_errors_name_the_argument():
    with pytest.raises(NasDoseError, match="unknown argument 'widthz'"):
        build_model(load_config(TrainConfig, overrides=["model.kwargs.widthz=[4, 8]"]).model)


@pytest.mark.parametrize("name", ["unet3d.yaml", "unet3d_synth32.yaml", "unet2d.yaml"])
def test_example_training_configs_load(name):
    path = CONFIGS / name
    cfg = load_config(TrainConfig, path)
    assert load_yaml(path)["model"]["name"] == cfg.model.name
    build_model(cfg.model)


def test_a_genotype_model_rebuilds_from_its_checkpoint_alone(data, tmp_path):
    from nas_dose.search_spaces import get_space, save_genotype

    genotype = get_space("lenas").sample(np.random.RandomState(0), macro={"stem": 4, "widths": [8, 16]})
    path = tmp_path / "g.yaml"
    save_genotype(path, genotype)
    cfg = config("epochs=1", "model.kwargs={}", f"model.genotype={path}")
    model = fresh(cfg)
    train_model(model, cfg, data, tmp_path / "run")
    path.unlink()  # the checkpoint holds the genotype itself
    loaded, meta = load_model(tmp_path / "run" / "checkpoints" / "last.pt")
    assert meta["model_config"]["genotype"] == genotype.to_dict()
    x = torch.rand(1, 10, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_genotype_with_kwargs_is_a_config_error():
    with pytest.raises(ConfigError, match="model.kwargs"):
        load_config(TrainConfig, overrides=["model.genotype=g.yaml", "model.kwargs.widths=[4]"])
