"""The distillation loss: its terms by hand, a discriminator that really trains, the warning
when the ground truth is switched off, and the objective's state for exact resumes."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from nas_dose.config import ConfigError, from_dict
from nas_dose.distill.losses import (
    AdversarialConfig,
    DistillObjective,
    FeatureTap,
    HintConfig,
    discriminator_loss,
    feature_channels,
    generator_loss,
    hint_loss,
)
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.training import DVHLossConfig, TrainConfig

CPU = Runtime(RuntimeConfig(device="cpu"))


def vector(*values: float) -> torch.Tensor:
    return torch.tensor(values).reshape(1, 1, 1, 1, len(values))


def bound(objective: DistillObjective, model: nn.Module | None = None, grid: int = 16) -> DistillObjective:
    objective.grid = grid
    objective.bind(model or nn.Identity(), CPU, TrainConfig())
    return objective


def test_ground_truth_and_teacher_terms_by_hand():
    objective = bound(DistillObjective(Path("unused.h5"), alpha_gt=2.0, alpha_teacher=0.5))
    batch = {"target": vector(0.25, 0.0, 1.0, 0.5), "teacher": vector(0.5, 0.0, 0.0, 0.0),
             "mask": vector(1.0, 1.0, 0.0, 0.0)}
    loss = objective.loss(vector(0.5, -1.0, 2.0, 0.0), batch)
    # inside the mask: |0.5-0.25| + |-1-0| = 1.25 over 2 voxels to the target; 0 + 1 = 1 over 2 to the teacher
    assert loss.item() == pytest.approx(2.0 * 0.625 + 0.5 * 0.5)
    assert objective.log_terms() == pytest.approx({"loss_gt": 0.625, "loss_teacher": 0.5})
    assert objective.log_terms() == {}  # means since the last call


@pytest.mark.parametrize("combine, loss, grad", [("sum", 1.0, 0.0), ("blend", 0.5, -2.0)])
def test_blend_keeps_a_gradient_between_reference_and_teacher(combine, loss, grad):
    """A prediction between the reference (0) and the teacher (1): two L1 terms cancel, the
    L1 to their mean does not."""
    objective = bound(DistillObjective(Path("unused.h5"), combine=combine))
    pred = vector(0.25).requires_grad_(True)
    value = objective.loss(pred, {"target": vector(0.0), "teacher": vector(1.0), "mask": vector(1.0)})
    value.backward()
    assert value.item() == pytest.approx(loss) and pred.grad.item() == pytest.approx(grad)
    assert objective.log_terms() == pytest.approx({"loss_gt": 0.25, "loss_teacher": 0.75})


def mixed_batch_loss(objective: DistillObjective, first: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (back-propagated) of two samples of 2 voxels: sample 0 with the reference (1, 0)
    and the teacher (0.5, 0), predicted (`first`, 0); sample 1 unlabeled (its target zero), the
    teacher (0.25, 0.75), predicted (0.5, 0.5). Returns the prediction (with its gradient) and the loss."""
    target = torch.cat([vector(1.0, 0.0), vector(0.0, 0.0)])
    teacher = torch.cat([vector(0.5, 0.0), vector(0.25, 0.75)])
    pred = torch.cat([vector(first, 0.0), vector(0.5, 0.5)]).requires_grad_(True)
    batch = {"target": target, "teacher": teacher, "mask": torch.ones(2, 1, 1, 1, 2),
             "labeled": torch.tensor([1.0, 0.0])}
    value = objective.loss(pred, batch)
    value.backward()
    return pred, value


@pytest.mark.parametrize("combine", ["blend", "sum"])
def test_an_unlabeled_sample_learns_from_the_teacher_alone(combine):
    """Sample 0 has a reference dose, sample 1 none (its target is zero and must not count):
    sample 1 weighs alpha_teacher times its L1 to the teacher, over the batch's mask voxels."""
    objective = bound(DistillObjective(Path("unused.h5"), alpha_gt=2.0, alpha_teacher=0.5, combine=combine))
    pred, value = mixed_batch_loss(objective, first=1.0)
    if combine == "blend":  # sample 0: 2.5·|1 - (2·1 + 0.5·0.5)/2.5| = 0.25; sample 1: 0.5·(0.25 + 0.25)
        expected, grad0 = (0.25 + 0.25) / 4, 2.5 / 4
    else:  # sample 0: 2·0 + 0.5·0.5; sample 1: 0.5·0.5 (no ground-truth term)
        expected, grad0 = (0.25 + 0.25) / 4, 0.5 / 4
    assert value.item() == pytest.approx(expected)
    assert pred.grad[0, 0, 0, 0, 0].item() == pytest.approx(grad0)
    assert pred.grad[1].abs().flatten().tolist() == pytest.approx([0.5 / 4] * 2)
    # logged: the ground-truth term over the labeled sample's voxels only, the teacher's over all
    assert objective.log_terms() == pytest.approx({"loss_gt": 0.0, "loss_teacher": (0.5 + 0.5) / 4})


def test_all_labeled_flags_change_nothing():
    objective = bound(DistillObjective(Path("unused.h5"), alpha_gt=2.0, alpha_teacher=0.5))
    batch = {"target": vector(0.25, 0.0, 1.0, 0.5), "teacher": vector(0.5, 0.0, 0.0, 0.0),
             "mask": vector(1.0, 1.0, 0.0, 0.0)}
    pred = vector(0.5, -1.0, 2.0, 0.0)
    assert objective.loss(pred, {**batch, "labeled": torch.ones(1)}).item() == objective.loss(pred, batch).item()


def test_unknown_combine_is_a_config_error():
    with pytest.raises(ConfigError, match="combine"):
        DistillObjective(Path("unused.h5"), combine="max")


def test_the_objective_consistency_term_is_refused_in_distillation():
    """Distillation's loss has its own terms: a consistency weight, which it would ignore, is
    refused (by the training config: `train.model` is never conditioned in a distillation config)."""
    from nas_dose.config import from_dict
    from nas_dose.distill.distill import DistillConfig

    with pytest.raises(ConfigError, match="consistency.weight"):
        from_dict(DistillConfig, {"train": {"consistency": {"weight": 0.5}}})


def test_hint_loss_by_hand():
    adapter = nn.Conv3d(2, 1, 1)
    with torch.no_grad():
        adapter.weight.copy_(torch.tensor([2.0, -1.0]).reshape(1, 2, 1, 1, 1))
        adapter.bias.fill_(0.5)
    s = torch.tensor([[1.0, 3.0], [0.0, 1.0]]).reshape(1, 2, 1, 1, 2)  # channel 0: (1, 3), channel 1: (0, 1)
    t = torch.tensor([1.0, 1.0]).reshape(1, 1, 1, 1, 2)
    # adapted: 2·1 - 0 + 0.5 = 2.5 and 2·3 - 1 + 0.5 = 5.5; errors 1.5² and 4.5²
    assert hint_loss([s], [t], [adapter]).item() == pytest.approx((1.5 ** 2 + 4.5 ** 2) / 2)
    # two layers are averaged; a coarser student feature is resized to the teacher's grid
    coarse = torch.ones(1, 2, 1, 1, 1)
    value = hint_loss([s, coarse], [t, t], [adapter, adapter]).item()
    assert value == pytest.approx(((1.5 ** 2 + 4.5 ** 2) / 2 + (0.5 ** 2 + 0.5 ** 2) / 2) / 2)


class ConstantCritic(nn.Module):
    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x: torch.Tensor, dose: torch.Tensor) -> torch.Tensor:
        return torch.full((dose.shape[0], 1, 2, 2, 2), self.logit)


def test_adversarial_losses_by_hand():
    x, dose = torch.zeros(1, 10, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)
    assert discriminator_loss(ConstantCritic(0.0), x, dose, dose).item() == pytest.approx(math.log(2))
    # logit 2: real term log(1 + e^-2), fake term log(1 + e^2)
    expected = 0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(2)))
    assert discriminator_loss(ConstantCritic(2.0), x, dose, dose).item() == pytest.approx(expected)
    assert generator_loss(ConstantCritic(2.0), x, dose).item() == pytest.approx(math.log1p(math.exp(-2)))


def adversarial_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 1, 16, 16, 16)
    teacher = torch.rand(1, 1, 16, 16, 16, generator=gen)
    return {"input": torch.randn(1, 10, 16, 16, 16, generator=gen), "target": teacher, "teacher": teacher,
            "mask": mask}


def test_the_discriminator_is_trained_and_its_loss_responds():
    torch.manual_seed(0)
    objective = bound(DistillObjective(Path("unused.h5"), adversarial=AdversarialConfig(weight=1.0, lr=1e-3)))
    assert objective.disc is not None
    before = [p.detach().clone() for p in objective.disc.parameters()]
    batch = adversarial_batch()
    fake = torch.zeros(1, 1, 16, 16, 16, requires_grad=True)  # a student that predicts nothing
    objective.loss(fake, batch).backward()
    first = objective.log_terms()
    assert all(not torch.equal(b, p) for b, p in zip(before, objective.disc.parameters()))
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # the term reaches the student
    for _ in range(30):
        objective.loss(fake, batch)
    later = objective.log_terms()
    # the critic learns to tell the teacher's dose from the empty one: its loss falls, and the
    # student's adversarial term (the critic calling the fake real) rises
    assert later["loss_discriminator"] < 0.8 * first["loss_discriminator"]
    assert later["loss_adversarial"] > first["loss_adversarial"] + 0.1
    state = objective.state_dict()
    assert set(state) >= {"discriminator", "d_optimizer"} and state["d_optimizer"]["state"]


def test_objective_state_round_trips():
    torch.manual_seed(0)
    a = bound(DistillObjective(Path("unused.h5"), adversarial=AdversarialConfig(weight=1.0)))
    a.loss(torch.zeros(1, 1, 16, 16, 16), adversarial_batch())
    torch.manual_seed(1)
    b = bound(DistillObjective(Path("unused.h5"), adversarial=AdversarialConfig(weight=1.0)))
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.disc.parameters(), b.disc.parameters()))
    assert b.log_terms() == pytest.approx(a.log_terms())
    plain = bound(DistillObjective(Path("unused.h5")))
    with pytest.raises(Exception, match="adversarial"):
        plain.load_state_dict(a.state_dict())


def test_alpha_gt_zero_warns_and_no_term_at_all_is_an_error():
    with pytest.warns(UserWarning, match="alpha_gt = 0"):
        DistillObjective(Path("unused.h5"), alpha_gt=0.0)
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        DistillObjective(Path("unused.h5"), alpha_gt=0.0, alpha_teacher=0.0)
    with pytest.raises(ConfigError, match="alpha_teacher"):
        DistillObjective(Path("unused.h5"), alpha_teacher=-1.0)


class Tiny(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Conv3d(10, width, 1)
        self.head = nn.Conv3d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_hints_through_adapters_from_an_online_teacher():
    torch.manual_seed(0)
    student, teacher = Tiny(3), Tiny(5)
    assert feature_channels(student, ["head"], (1, 10, 4, 4, 4)) == [3]
    objective = bound(DistillObjective(Path("unused.h5"), alpha_gt=1.0, alpha_teacher=0.0,
                                       hint=HintConfig(weight=2.0), hint_teacher=teacher), student)
    assert [tuple(p.shape) for p in objective.parameters()] == [(5, 3, 1, 1, 1), (5,)]
    batch = adversarial_batch()
    pred = student(batch["input"])
    loss = objective.loss(pred, batch)
    with torch.no_grad():
        expected_hint = hint_loss([student.body(batch["input"])], [teacher.body(batch["input"])], objective.adapters)
        expected_gt = (pred - batch["target"]).abs().mean()
    assert loss.item() == pytest.approx(expected_gt.item() + 2.0 * expected_hint.item(), rel=1e-5)
    loss.backward()
    assert objective.adapters[0].weight.grad is not None and student.body.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(Exception, match="no module 'nope'"):
        FeatureTap(student, ["nope"])


def test_per_pair_weights_in_the_config_change_the_hint_term():
    """Adapters zeroed: each pair's error is the mean square of the teacher's feature, 1 (the
    input of ones) at `body` and 4 (the teacher's body outputs 2) at `head`."""
    torch.manual_seed(0)
    student, teacher = Tiny(3), Tiny(5)
    with torch.no_grad():
        teacher.body.weight.zero_()
        teacher.body.bias.fill_(2.0)
    hint = from_dict(HintConfig, {"weight": 2.0, "layers": [["body", "body", 3.0], ["head", "head"]]})
    objective = DistillObjective(Path("unused.h5"), alpha_teacher=0.0, hint=hint, hint_teacher=teacher)
    objective = bound(objective, student, grid=4)
    assert [tuple(a.weight.shape[:2]) for a in objective.adapters] == [(10, 10), (5, 3)]
    with torch.no_grad():
        for adapter in objective.adapters:
            adapter.weight.zero_()
            adapter.bias.zero_()
    x = torch.ones(1, 10, 4, 4, 4)
    pred = student(x)
    batch = {"input": x, "target": pred.detach(), "teacher": pred.detach(), "mask": torch.ones(1, 1, 4, 4, 4)}
    assert objective.loss(pred, batch).item() == pytest.approx(2.0 * (3 * 1 + 1 * 4) / 4)
    assert objective.log_terms()["loss_hint"] == pytest.approx(7 / 4)


def test_with_teacher_on_unlabeled_a_labeled_sample_learns_from_its_reference_alone():
    """Sample 0 (a reference dose) weighs alpha_gt times its L1 to the reference, whatever the
    teacher says there; sample 1 (none) alpha_teacher times its L1 to the teacher."""
    objective = bound(DistillObjective(Path("unused.h5"), alpha_gt=2.0, alpha_teacher=0.5, teacher_on="unlabeled"))
    pred, value = mixed_batch_loss(objective, first=0.5)
    # sample 0: 2·(|0.5 - 1| + 0), though the teacher's 0.5 is met; sample 1: 0.5·(0.25 + 0.25); 4 voxels
    assert value.item() == pytest.approx((2.0 * 0.5 + 0.5 * 0.5) / 4)
    assert pred.grad[0].flatten().tolist() == pytest.approx([-2.0 / 4, 0.0])
    assert pred.grad[1].abs().flatten().tolist() == pytest.approx([0.5 / 4] * 2)
    with pytest.raises(ConfigError, match="'teacher_on'"):
        DistillObjective(Path("unused.h5"), teacher_on="labeled")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs combine=blend"):
        DistillObjective(Path("unused.h5"), combine="sum", teacher_on="unlabeled")


def test_an_unlabeled_patient_shows_the_discriminator_the_teachers_dose_as_real():
    """With adversarial.real=target, a patient without a plan (target zero) must not teach the
    critic that an empty dose is real: its real dose is the teacher's."""
    torch.manual_seed(0)
    objective = bound(DistillObjective(Path("unused.h5"), adversarial=AdversarialConfig(weight=1.0, real="target")))
    seen = []
    objective.discriminator_step = lambda x, real, fake: seen.append(real) or torch.zeros(())  # type: ignore
    batch = adversarial_batch()
    batch = {k: torch.cat([v, v]) for k, v in batch.items()}
    batch["target"] = torch.stack([batch["teacher"][0] * 0.5, torch.zeros_like(batch["teacher"][0])])
    batch["labeled"] = torch.tensor([1.0, 0.0])
    objective.loss(torch.zeros(2, 1, 16, 16, 16, requires_grad=True), batch)
    assert torch.equal(seen[0][0], batch["target"][0]) and torch.equal(seen[0][1], batch["teacher"][1])


def _dvh_batch(labeled: list[float]) -> dict[str, torch.Tensor]:
    """Two 8³ items: an OAR (channel of the first OAR) and a PTV70, target and teacher doses."""
    from nas_dose.data.dataset import CHANNELS
    from nas_dose.data.patient import OARS

    n = len(labeled)
    x = torch.zeros(n, 10, 8, 8, 8)
    x[:, CHANNELS.index(OARS[0]), :4] = 1.0
    x[:, CHANNELS.index("ptv"), 4:] = 1.0
    gen = torch.Generator().manual_seed(1)
    return {"input": x, "target": torch.rand(n, 1, 8, 8, 8, generator=gen),
            "teacher": torch.rand(n, 1, 8, 8, 8, generator=gen), "mask": torch.ones(n, 1, 8, 8, 8),
            "labeled": torch.tensor(labeled)}


def test_the_dvh_term_of_distillation_uses_the_teacher_where_there_is_no_plan():
    from nas_dose.training.losses import dvh_moment_loss

    dvh = DVHLossConfig(weight=0.5)
    batch = _dvh_batch([1.0, 0.0])
    plain = bound(DistillObjective(Path("unused.h5")))
    with_dvh = DistillObjective(Path("unused.h5"))
    with_dvh.grid = 16
    with_dvh.bind(nn.Identity(), CPU, TrainConfig(dvh_loss=dvh))
    pred = torch.stack([batch["target"][0], batch["teacher"][1]])  # each item equals its DVH reference
    assert with_dvh.loss(pred, batch).item() == pytest.approx(plain.loss(pred, batch).item())
    assert with_dvh.log_terms()["loss_dvh"] == pytest.approx(0.0, abs=1e-6)
    other = torch.zeros_like(pred)
    expected = dvh_moment_loss(other, torch.stack([batch["target"][0], batch["teacher"][1]]), batch["input"], dvh)
    assert with_dvh.loss(other, batch).item() == pytest.approx(plain.loss(other, batch).item()
                                                               + 0.5 * expected.item(), rel=1e-5)


def test_dvh_weights_select_targets_or_organs():
    from nas_dose.training.losses import dvh_moment_loss

    batch = _dvh_batch([1.0])
    pred = batch["target"].clone()
    pred[..., 4:, :, :] += 0.3  # wrong only inside the PTV
    only_oars = DVHLossConfig(weight=1.0, target_weight=0.0, oar_weight=1.0)
    only_targets = DVHLossConfig(weight=1.0, target_weight=1.0, oar_weight=0.0)
    assert dvh_moment_loss(pred, batch["target"], batch["input"], only_oars).item() == pytest.approx(0.0, abs=1e-6)
    assert dvh_moment_loss(pred, batch["target"], batch["input"], only_targets).item() > 0.1
    with pytest.raises(ConfigError, match="not both 0"):
        DVHLossConfig(target_weight=0.0, oar_weight=0.0).validate()
