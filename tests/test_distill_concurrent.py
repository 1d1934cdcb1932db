"""`mode: concurrent`: the teacher's members trained from scratch in the student's steps, the
student taught by their current prediction, exact resume of both, and a privileged teacher that
sees the plans' preferences as extra channels while the student does not."""
from pathlib import Path

import pytest
import torch

from nas_dose import cli
from nas_dose.config import ConfigError, load_config
from nas_dose.data.dataset import IN_CHANNELS, DoseDataset
from nas_dose.distill import distill as distill_stage
from nas_dose.distill.concurrent import ConcurrentConfig, ConcurrentObjective, Privileged, teacher_members
from nas_dose.inference import Ensemble, load_predictor, save_ensemble
from nas_dose.io import load_checkpoint, load_json
from nas_dose.models.factory import CHECKPOINT_FORMAT, ModelConfig, build_model, model_spec
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.search_spaces import get_space, save_genotype
from nas_dose.training import TrainConfig, masked_loss

CPU = Runtime(RuntimeConfig(device="cpu"))
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHOICES = {"down.op1": "conv", "down.op2": "identity", "down.connect": "identity", "down.down": "max_pool",
           "up.op1": "conv", "up.op2": "identity", "up.connect": "identity", "up.up": "up_interpolate"}
TINY = ["train.epochs=2", "train.steps_per_epoch=2", "train.optim.lr=0.003", "train.log_every=1",
        "train.checkpoint_every=2", "runtime.device=cpu", "runtime.threads=1", "latency.size=16", "latency.runs=1",
        "mode=concurrent"]


@pytest.fixture(scope="module")
def architectures(tmp_path_factory) -> Path:
    """An ensemble.yaml of two untrained LENAS members (weights 3:1): only their architectures count."""
    root = tmp_path_factory.mktemp("architectures")
    names = []
    for i, widths in enumerate(([8, 8], [6, 12])):
        name = f"m{i}"
        folder = root / "members" / name
        save_genotype(folder / "genotype.yaml", get_space("lenas").genotype(CHOICES, {"stem": 4, "widths": widths}))
        cfg = ModelConfig(name="lenas", genotype=str(folder / "genotype.yaml"))
        torch.save({"format": CHECKPOINT_FORMAT, "model_config": model_spec(cfg), "grid": 16,
                    "model": build_model(cfg).state_dict()}, folder / "best.pt")
        names.append(name)
    save_ensemble(root / "ensemble.yaml", names, [3.0, 1.0], selection="test", combination="test", tta=False)
    return root / "ensemble.yaml"


def nasdose(*args) -> int:
    return cli.main([str(a) for a in args])


def test_members_learn_in_the_students_steps_and_teach_their_current_prediction(data, architectures):
    torch.manual_seed(0)
    members = teacher_members(architectures, ConcurrentConfig())
    assert [m.weight for m in members] == [0.75, 0.25]
    objective = ConcurrentObjective(members, [], seed=0, alpha_gt=1.0, alpha_teacher=1.0, combine="sum")
    student = build_model(ModelConfig(kwargs={"widths": [4, 8]}))
    objective.train_set(data, TrainConfig())
    objective.bind(student, CPU, TrainConfig())
    batch = next(iter(torch.utils.data.DataLoader(DoseDataset(data, "train"), batch_size=2)))
    with torch.no_grad():
        expected = sum(m.weight * net(batch["input"]).clamp_min(0) for m, net in zip(members, objective.nets))
    before = [p.detach().clone() for p in objective.nets.parameters()]
    pred = student(batch["input"])
    objective.loss(pred, batch)
    # the teacher term is the L1 to the members' prediction before their step; then they stepped
    teacher_term = masked_loss(pred.detach(), expected * batch["mask"], batch["mask"])
    terms = objective.log_terms()
    assert terms["loss_teacher"] == pytest.approx(teacher_term.item(), rel=1e-5)
    assert {"loss_member_m0", "loss_member_m1"} <= set(terms)
    assert all(not torch.equal(b, p) for b, p in zip(before, objective.nets.parameters()) if p.dim() > 1)
    assert objective.t_scheduler.last_epoch == 1


def test_concurrent_run_resumes_exactly_and_writes_its_teacher(data, architectures, tmp_path, cut_training,
                                                               monkeypatch):
    args = [architectures, "--student", "unet3d:widths=4,8", "--data", data, "--no-baseline", "-q", *TINY,
            "hint.weight=0.5", "hint.levels=encoder_decoder"]
    with monkeypatch.context() as m:  # the uninterrupted run's checkpoint is all that is compared
        m.setattr(distill_stage, "_report", lambda *args: {})
        assert nasdose("distill", *args, "--out", tmp_path / "whole") == 0
    cut_training(distill_stage, 3)
    assert nasdose("distill", *args, "--out", tmp_path / "cut") == 130
    cut_training(distill_stage, None)
    assert nasdose("distill", *args, "--out", tmp_path / "cut", "--resume") == 0
    whole, cut = (load_checkpoint(tmp_path / r / "student" / "checkpoints" / "last.pt") for r in ("whole", "cut"))
    assert cut["step"] == 4
    for key in ("members", "t_optimizer", "adapters"):
        a, b = whole["objective"][key], cut["objective"][key]
        flat = a["state"] if key == "t_optimizer" else a
        assert flat and all(torch.equal(v, (b["state"] if key == "t_optimizer" else b)[k])
                            for k, v in flat.items() if isinstance(v, torch.Tensor))
    assert torch.equal(whole["model"]["head.weight"], cut["model"]["head.weight"])
    teacher = load_predictor(tmp_path / "cut" / "teacher" / "ensemble.yaml", CPU, 16)
    assert isinstance(teacher, Ensemble) and len(teacher.members) == 2
    assert torch.equal(teacher.members[1].head.weight, whole["objective"]["members"]["1.head.weight"])
    metrics = load_json(tmp_path / "cut" / "metrics.json")
    assert metrics["mode"] == "concurrent" and [r["name"] for r in metrics["rows"]][:2] == [
        "student (distilled)", "ensemble (teacher, 2 members)"]
    log = [line for line in (tmp_path / "cut" / "student" / "log.jsonl").read_text().splitlines() if line]
    assert '"loss_member_m0"' in log[-1] and '"loss_hint"' in log[-1]


def test_a_privileged_teacher_sees_the_preferences_and_the_student_does_not(plan_data, architectures, tmp_path,
                                                                          monkeypatch, cut_training):
    seen: dict[str, list[int]] = {"student": [], "teacher": []}
    members = teacher_members(architectures, ConcurrentConfig(members=[1], privileged=["oar", "hi"]))
    assert members[0].spec["genotype"]["macro"]["in_channels"] == IN_CHANNELS + 2 and members[0].weight == 1.0
    original_bind = ConcurrentObjective.bind

    def bind(self, model, runtime, config):
        original_bind(self, model, runtime, config)
        assert isinstance(self.nets[0], Privileged)
        model.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].shape[1]))
        self.nets[0].net.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0].shape[1]))

    monkeypatch.setattr(ConcurrentObjective, "bind", bind)
    # the shipped example, tiny, with the second member as the teacher
    args = [architectures, "--student", "unet3d:widths=4,8", "--data", plan_data, "-q", "--config",
            CONFIGS / "distill_privileged.yaml", *TINY, "concurrent.members=[1]", "--no-baseline"]
    cut_training(distill_stage, 3)
    assert nasdose("distill", *args, "--out", tmp_path / "run") == 130
    assert len(seen["teacher"]) == 3  # once per training step; never at validation
    cut_training(distill_stage, None)
    assert nasdose("distill", *args, "--out", tmp_path / "run", "--resume") == 0  # from step 2
    assert set(seen["student"]) == {IN_CHANNELS} and set(seen["teacher"]) == {IN_CHANNELS + 2}
    assert len(seen["teacher"]) == 3 + 2
    assert load_checkpoint(tmp_path / "run" / "student" / "checkpoints" / "last.pt")["step"] == 4
    metrics = load_json(tmp_path / "run" / "metrics.json")
    assert metrics["privileged"] == ["oar", "hi"] and metrics["teacher_val_dose_score"] > 0
    assert [r["name"] for r in metrics["rows"]] == ["student (distilled)"]
    member = load_checkpoint(tmp_path / "run" / "teacher" / "members" / "m1" / "best.pt")
    assert member["model_config"]["genotype"]["macro"]["in_channels"] == IN_CHANNELS + 2
    with pytest.raises(ConfigError, match="mode=concurrent"):
        load_config(distill_stage.Config, overrides=["concurrent.privileged=[oar]"])


def test_unlabeled_patients_are_refused_in_concurrent_mode(unlabeled_data, architectures, tmp_path, capsys):
    assert nasdose("distill", architectures, "--student", "unet3d:widths=4,8", "--data", unlabeled_data,
                   "--out", tmp_path / "run", *TINY) == 1
    assert "set unlabeled.split=null to leave out the" in capsys.readouterr().err
