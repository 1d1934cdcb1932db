"""A teacher that sees an extra input channel of the data set (a beam plate) its student does not:
concurrent (`concurrent.privileged: [beam_plate]`) and two-stage (`train.data.hide`)."""
from pathlib import Path

import pytest
import torch

from nas_dose import cli
from nas_dose.config import ConfigError, load_config
from nas_dose.data.dataset import IN_CHANNELS
from nas_dose.data.store import write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.distill import distill as distill_stage
from nas_dose.distill.concurrent import ConcurrentObjective
from nas_dose.distill.losses import DistillObjective
from nas_dose.inference import trained_inputs
from nas_dose.io import load_checkpoint, load_json
from nas_dose.models.factory import CHECKPOINT_FORMAT, ModelConfig, build_model, model_spec
from nas_dose.train import Inputs as TrainInputs
from nas_dose.train import run as train
from nas_dose.training import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["train.epochs=2", "train.steps_per_epoch=2", "train.optim.lr=0.003", "runtime.device=cpu",
        "runtime.threads=1", "latency.size=16", "latency.runs=1", "unlabeled.split=null"]


@pytest.fixture(scope="module")
def plates(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plates") / "plates.h5"
    write_dataset(path, synth_patients(8, 16, 0, beam_plates=True), source="test", grid=16)
    return path


def nasdose(*args) -> int:
    return cli.main([str(a) for a in args])


def record_inputs(monkeypatch, cls: type, teacher: str) -> dict[str, set[int]]:
    """The input channel counts the student and the teacher network `teacher` (an attribute path
    of the bound objective) are called with."""
    seen: dict[str, set[int]] = {"student": set(), "teacher": set()}
    original = cls.bind

    def bind(self, model, runtime, config):
        original(self, model, runtime, config)
        net = self
        for name in teacher.split("."):
            net = net[int(name)] if name.isdigit() else getattr(net, name)
        model.register_forward_pre_hook(lambda m, a: seen["student"].add(a[0].shape[1]))
        net.register_forward_pre_hook(lambda m, a: seen["teacher"].add(a[0].shape[1]))

    monkeypatch.setattr(cls, "bind", bind)
    return seen


def test_a_concurrent_teacher_sees_a_beam_plate_and_the_student_does_not(plates, tmp_path, monkeypatch):
    arch = tmp_path / "arch.pt"
    cfg = ModelConfig(kwargs={"widths": [4, 8]})
    torch.save({"format": CHECKPOINT_FORMAT, "model_config": model_spec(cfg), "grid": 16,
                "model": build_model(cfg).state_dict()}, arch)  # architecture only, trained on standard data
    seen = record_inputs(monkeypatch, ConcurrentObjective, "nets.0")
    # the shipped example, tiny
    assert nasdose("distill", arch, "--student", "unet3d:widths=4,8", "--data", plates, "--out", tmp_path / "run",
                   "-q", "--config", CONFIGS / "distill_beam_plates.yaml", *TINY) == 0
    assert seen == {"student": {IN_CHANNELS}, "teacher": {IN_CHANNELS + 1}}
    run = tmp_path / "run"
    assert trained_inputs(run / "student") == trained_inputs(run / "baseline") == ()
    member = load_checkpoint(run / "teacher" / "members" / "teacher" / "best.pt")
    assert member["model_config"]["inputs"] == ["beam_plate"] and member["config"]["data"]["hide"] == []
    metrics = load_json(run / "metrics.json")
    assert metrics["privileged"] == ["beam_plate"]
    # the teacher predicts the data set that has its plates; the rows score all three
    assert [r["name"] for r in metrics["rows"]] == ["student (distilled)", "ensemble (teacher, 1 member)",
                                                     "student arch., no distillation"]
    assert all(r["dose_score"] > 0 for r in metrics["rows"])
    assert "The teacher also saw beam_plate; the student and its baseline did not" in (
        run / "comparison.md").read_text()


def test_a_privileged_name_must_be_a_preference_or_a_channel_of_the_data(plates, tmp_path, capsys):
    assert nasdose("distill", tmp_path / "none.pt", "--student", "unet3d:widths=4,8", "--data", plates, "--out",
                   tmp_path / "run", "-q", "mode=concurrent", "concurrent.privileged=[dose_bath]", *TINY) == 1
    assert ("'concurrent.privileged': dose_bath is neither a preference (oar, hi) nor an extra input channel of "
            f"{plates} ([beam_plate])") in capsys.readouterr().err
    assert nasdose("distill", tmp_path / "none.pt", "--student", "unet3d:widths=4,8", "--data", plates, "--out",
                   tmp_path / "run2", "-q", "mode=concurrent", "train.data.hide=[beam_plate]", *TINY) == 1
    assert "name beam_plate in concurrent.privileged instead" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="a name twice"):
        load_config(distill_stage.Config, overrides=["mode=concurrent", "concurrent.privileged=[hi, hi]"])


def test_a_two_stage_teacher_with_plates_hints_a_student_without(plates, tmp_path, monkeypatch):
    cfg = load_config(TrainConfig, overrides=["model.kwargs.widths=[4, 8]", "epochs=1", "steps_per_epoch=2",
                                              "runtime.device=cpu", "runtime.threads=1"])
    train(cfg, TrainInputs(plates), tmp_path / "teacher", official=False)
    seen = record_inputs(monkeypatch, DistillObjective, "hint_teacher")
    assert nasdose("distill", tmp_path / "teacher", "--student", "unet3d:widths=4,8", "--data", plates, "--out",
                   tmp_path / "run", "-q", "train.data.hide=[beam_plate]", "hint.weight=0.5",
                   "hint.levels=encoder_decoder", *TINY) == 0
    assert seen == {"student": {IN_CHANNELS}, "teacher": {IN_CHANNELS + 1}}
    assert trained_inputs(tmp_path / "run" / "student") == ()
    rows = load_json(tmp_path / "run" / "metrics.json")["rows"]
    assert len(rows) == 3 and rows[1]["flops"] > rows[0]["flops"]  # the teacher's FLOPs count its plate channel
