"""The distillation objective: ground truth, teacher, feature hints and a trained discriminator.

    loss = (alpha_gt + alpha_teacher) · L(pred, (alpha_gt · dose + alpha_teacher · teacher)
                                               / (alpha_gt + alpha_teacher))       combine=blend
           (or alpha_gt · L(pred, dose) + alpha_teacher · L(pred, teacher)          combine=sum)
           + hint.weight · weighted mean over hint pairs of MSE(adapter(student feature), teacher feature)
           + adversarial.weight · BCE(D(input, pred), real)

L is the training engine's masked loss (`train.loss`, L1 by default) inside the possible-dose
mask; the teacher is the ensemble's cached prediction. An unlabeled patient (contours, no
plan) has no reference dose: its alpha_gt is 0, so it learns from the teacher alone (its
blend is the teacher's dose, weighted alpha_teacher). `blend` (the default) is one L1 to the
weighted mean of the two targets. The `sum` of two L1 terms has a flat minimum: wherever the
prediction lies between the reference and the teacher, with equal weights, the two gradients
cancel and that voxel teaches nothing.
Unlike LENAS's published KDA-Net code, the ground truth is always part of the loss unless
alpha_gt = 0 is asked for (which warns),
and the discriminator is trained: its own Adam, one update per student step on the teacher's
(or the reference) dose against the student's detached prediction, before the student's update
(alternating, as in a GAN), its weights and optimizer state in every checkpoint.

Hints match features, the input of named modules, through 1×1×1 adapters (trained with the
student by its optimizer): pairs named in `hint.layers`, each with its weight, or the resolution
levels the two U-Nets share (`hint.levels`, nas_dose.distill.levels), each level with its
weight. The teacher's features would be as large as the volumes times their channels for every
patient, too large to cache; so one ensemble member runs online on the augmented input at each
step (no gradients) while hints are on (in concurrent mode the members' own training pass gives
them: nas_dose.distill.concurrent). They are off by default.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from nas_dose import distributed
from nas_dose.cascade.objective import CascadeObjective
from nas_dose.cascade.patches import PatchDataset
from nas_dose.config import ConfigError, at_least
from nas_dose.data.dataset import IN_CHANNELS, DoseDataset, TrainingSet, unhide, unhide_order
from nas_dose.errors import NasDoseError
from nas_dose.models.conditioning import preference_shapes
from nas_dose.runtime import Runtime
from nas_dose.search_spaces.measure import meta_copy, meta_forward
from nas_dose.training import Objective, TrainConfig, masked_loss
from nas_dose.training.engine import forward
from nas_dose.training.losses import dvh_moment_loss, share_weight

from .levels import Levels, level_pairs
from .teacher import PlanTeacherDataset, TeacherDataset


@dataclass
class HintConfig:
    """Feature matching: `layers` pairs (student module, teacher module[, weight]) by name, the
    features being each module's input (`head`: the last full-resolution features of both U-Net
    kinds); a pair's weight is 1 unless given. `levels` (encoder | decoder | encoder_decoder)
    pairs the U-Nets' resolution levels instead (`nas_dose.distill.levels`), level k weighing
    `level_weights[k]` (the last entry for deeper levels; 1 without any). The hint term is the
    weighted mean of the pairs' errors. `member`: the ensemble member that runs online for the
    teacher's features (default: the heaviest-weighted)."""

    weight: float = 0.0
    layers: list[tuple[str, str] | tuple[str, str, float]] = field(default_factory=lambda: [("head", "head")])
    levels: Levels | None = None
    level_weights: list[float] = field(default_factory=list)
    member: int | None = None

    def validate(self) -> None:
        check_non_negative("hint.weight", self.weight)
        if self.weight > 0 and not self.layers and self.levels is None:
            raise ConfigError("config key 'hint.layers': hints need at least one (student, teacher) pair")
        if self.levels is not None and [tuple(p) for p in self.layers] != [("head", "head")]:
            raise ConfigError("config key 'hint.layers': give hint.layers or hint.levels, not both")
        if self.levels is None and self.level_weights:
            raise ConfigError("config key 'hint.level_weights': weighs the levels of hint.levels, which is not set")
        for i, pair in enumerate(self.layers):
            check_non_negative(f"hint.layers[{i}] weight", float(pair[2]) if len(pair) == 3 else 1.0)
        for i, w in enumerate(self.level_weights):
            check_non_negative(f"hint.level_weights[{i}]", w)

    def pairs(self, student: nn.Module, teacher: nn.Module) -> list[tuple[str, str, float]]:
        """(student module, teacher module, weight) of every hint; a weighted mean needs one > 0."""
        if self.levels is not None:
            pairs = level_pairs(student, teacher, self.levels, self.level_weights)
        else:
            pairs = [(p[0], p[1], float(p[2]) if len(p) == 3 else 1.0) for p in self.layers]
        if not sum(w for _, _, w in pairs) > 0:
            raise ConfigError("config key 'hint': every hint weighs 0 (hint.layers or hint.level_weights)")
        return pairs


@dataclass
class AdversarialConfig:
    """A conditional patch discriminator on (input, dose): `real` doses are the teacher's or the
    reference; the student's prediction is the fake one."""

    weight: float = 0.0
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    width: int = 8
    real: Literal["teacher", "target"] = "teacher"

    def validate(self) -> None:
        check_non_negative("adversarial.weight", self.weight)
        if not self.lr > 0:
            raise ConfigError(f"config key 'adversarial.lr': must be positive, got {self.lr}")
        at_least("adversarial.width", self.width, 1)


def check_non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"config key '{key}': must be >= 0, got {value}")


# ---------------------------------------------------------------------------------------------
# The terms.

def hint_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
              adapters: Iterable[nn.Module], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Mean over layers, weighted by `weights` (equal without), of the MSE between adapted student
    features (resized to the teacher's spatial size when they differ) and teacher features."""
    weights = [1.0] * len(teacher) if weights is None else list(weights)
    total = torch.zeros((), device=teacher[0].device)
    for s, t, adapter, w in zip(student, teacher, adapters, weights, strict=True):
        a = adapter(s.float())
        if a.shape[2:] != t.shape[2:]:
            a = F.interpolate(a, size=t.shape[2:], mode="trilinear", align_corners=False)
        total = total + w * F.mse_loss(a, t.float())
    return total / sum(weights)


class Discriminator(nn.Module):
    """Patch critic of a dose given the patient: (input channels + dose) -> a logit per patch
    (two stride-2 4³ convolutions, then a 3³ one: 1/4 of the grid per axis)."""

    def __init__(self, in_channels: int = IN_CHANNELS + 1, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv3d(width, 2 * width, 4, stride=2, padding=1, bias=False),  # the norm would cancel a bias
            nn.InstanceNorm3d(2 * width, affine=True),
            nn.LeakyReLU(0.2), nn.Conv3d(2 * width, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, dose: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.float(), dose.float()], dim=1))


def discriminator_loss(d: nn.Module, x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of telling real doses (label 1) from fake ones (label 0), halved."""
    lr, lf = d(x, real), d(x, fake)
    return 0.5 * (F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
                  + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf)))


def generator_loss(d: nn.Module, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The student's adversarial term: cross-entropy of `d` calling its dose real (non-saturating)."""
    logits = d(x, fake)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


# ---------------------------------------------------------------------------------------------
# Features of named modules.

class FeatureTap:
    """Keeps the input of each named module of `model` from its latest forward pass in training
    mode (in eval mode nothing is kept, so validation holds no extra memory)."""

    def __init__(self, model: nn.Module, names: Sequence[str], always: bool = False) -> None:
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            known = ", ".join(n for n in list(modules)[1:12])
            raise NasDoseError(f"hint.layers: {type(model).__name__} has no module '{unknown[0]}' (some: {known}, ...)")
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        for n in self.names:
            modules[n].register_forward_pre_hook(self._hook(n, always))

    def _hook(self, name: str, always: bool):
        def keep(module: nn.Module, args: tuple[Any, ...]) -> None:
            if always or module.training:
                self.features[name] = args[0]

        return keep

    def take(self) -> list[torch.Tensor]:
        """The kept features in `names` order, forgotten here."""
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise NasDoseError(f"hint.layers: module '{missing[0]}' was not run by the forward pass")
        return [self.features.pop(n) for n in self.names]


def feature_channels(model: nn.Module, names: Sequence[str], input_shape: Sequence[int],
                     *more_shapes: Sequence[int]) -> list[int]:
    """Channels of the input of each named module, from a forward pass on the meta device
    (nothing is computed); `more_shapes`: of more inputs the model takes."""
    meta = meta_copy(model)
    tap = FeatureTap(meta, names, always=True)
    meta_forward(meta, input_shape, *more_shapes)
    return [f.shape[1] for f in tap.take()]


# ---------------------------------------------------------------------------------------------
# The objective.

TERMS = ("gt", "teacher", "hint", "adversarial", "discriminator", "dvh")
Combine = Literal["blend", "sum"]
COMBINE: tuple[str, ...] = ("blend", "sum")
# Whose target the teacher's dose enters: every patient's, or only the unlabeled ones' (the
# labeled learn from their reference dose alone, as the baseline does).
TeacherOn = Literal["all", "unlabeled"]
TEACHER_ON: tuple[str, ...] = ("all", "unlabeled")


class DistillObjective(Objective):
    """The training engine's objective for distillation (see the module docstring).

    `hint_teacher`: the network whose features the hints match (needed when hints are on).
    `unlabeled_split`: a split of patients without a plan, trained on with the training split.
    """

    def __init__(self, cache: Path, alpha_gt: float = 1.0, alpha_teacher: float = 1.0,
                 hint: HintConfig | None = None, adversarial: AdversarialConfig | None = None,
                 hint_teacher: nn.Module | None = None, combine: Combine = "blend",
                 unlabeled_split: str | None = None, teacher_on: TeacherOn = "all") -> None:
        self.cache = Path(cache)
        self.unlabeled_split = unlabeled_split
        self.channels = IN_CHANNELS  # the training set's input channels (train_set)
        # the extra input channels the student does not see, and where they go back (`keep`)
        self.hide: tuple[str, ...] = ()
        self.order = unhide_order((), ())
        if teacher_on not in TEACHER_ON:
            raise ConfigError(f"config key 'teacher_on': expected one of {', '.join(TEACHER_ON)}, got {teacher_on!r}")
        if teacher_on == "unlabeled" and combine != "blend":
            raise ConfigError("config key 'teacher_on': 'unlabeled' needs combine=blend")
        self.teacher_on = teacher_on
        self.alpha_gt, self.alpha_teacher = alpha_gt, alpha_teacher
        if combine not in COMBINE:
            raise ConfigError(f"config key 'combine': expected one of {', '.join(COMBINE)}, got {combine!r}")
        self.combine = combine
        self.hint = hint or HintConfig()
        self.adv = adversarial or AdversarialConfig()
        check_non_negative("alpha_gt", alpha_gt)
        check_non_negative("alpha_teacher", alpha_teacher)
        self.hint.validate()
        self.adv.validate()
        if not (alpha_gt or alpha_teacher or self.hint.weight or self.adv.weight):
            raise ConfigError("distillation: every loss weight is 0 (alpha_gt, alpha_teacher, hint.weight, "
                              "adversarial.weight); the student would learn nothing")
        if alpha_gt == 0:
            warnings.warn("alpha_gt = 0: the student never sees the reference dose, only the teacher",
                          UserWarning, stacklevel=2)
        if self.hint.weight > 0 and hint_teacher is None:
            raise ValueError("DistillObjective: hints need the teacher network (hint_teacher)")
        self.hint_teacher = hint_teacher
        self.adapters = nn.ModuleList()
        self.disc: Discriminator | None = None
        self.d_optimizer: torch.optim.Optimizer | None = None

    def train_set(self, data: Path, config: TrainConfig) -> TrainingSet:
        dataset: TeacherDataset | PlanTeacherDataset = (  # a conditioned teacher's: per plan
            PlanTeacherDataset(data, config.data.train_split, self.cache, augment=config.data.augment, seed=config.seed,
                               hide=config.data.hide)
            if config.data.plans else
            TeacherDataset(data, config.data.train_split, self.cache, augment=config.data.augment,
                           seed=config.seed, unlabeled_split=self.unlabeled_split, hide=config.data.hide))
        self.keep(dataset)
        return dataset

    def keep(self, dataset: DoseDataset) -> None:
        """What the objective needs of its training set: grid, the student's channels and the
        hidden ones (and where they go back for the teacher)."""
        self.grid, self.channels, self.hide = dataset.grid, dataset.in_channels, dataset.hide
        self.order = unhide_order(dataset.data.extra_channels, dataset.hide)

    def teacher_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` as the teacher takes it: with the channels hidden from the student
        (`train.data.hide`) back in its input."""
        if not self.hide:
            return batch
        return {**batch, "input": unhide(batch["input"], batch["hidden"], self.order)}

    def bind(self, model: nn.Module, runtime: Runtime, config: TrainConfig) -> None:
        super().bind(model, runtime, config)
        self.runtime = runtime
        device = runtime.device
        self.order = self.order.to(device)
        self.sums = torch.zeros(len(TERMS), device=device)
        self.count = 0
        if self.hint.weight > 0:
            assert self.hint_teacher is not None
            pairs = self.hint.pairs(model, self.hint_teacher)
            names_s, names_t = [s for s, _, _ in pairs], [t for _, t, _ in pairs]
            self.hint_weights = [w for _, _, w in pairs]
            shape = (1, self.channels, *(self.grid,) * 3)
            c_s = feature_channels(model, names_s, shape, *preference_shapes(model))
            c_t = feature_channels(self.hint_teacher, names_t, *self.teacher_shapes(shape),
                                   *preference_shapes(self.hint_teacher))
            self.adapters = nn.ModuleList(nn.Conv3d(a, b, 1) for a, b in zip(c_s, c_t)).to(device)
            self.student_tap = FeatureTap(model, names_s)
            self.hint_teacher = self.hint_teacher.to(device)
            self.teacher_tap = FeatureTap(self.hint_teacher, names_t, always=True)
            self.bind_teacher(self.hint_teacher)
        if self.adv.weight > 0:
            self.disc = Discriminator(self.channels + 1, self.adv.width).to(device)
            self.d_optimizer = torch.optim.Adam(self.disc.parameters(), lr=self.adv.lr, betas=self.adv.betas)

    def teacher_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The shapes of the hint teacher's inputs for a student input of `input_shape`."""
        return [(input_shape[0], input_shape[1] + len(self.hide), *input_shape[2:])]

    def bind_teacher(self, teacher: nn.Module) -> None:
        """A cached teacher's member runs frozen, for its features alone."""
        teacher.eval().requires_grad_(False)

    def teacher_features(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The hint teacher's features for `batch`: one forward pass without gradients (a
        conditioned teacher's asked for the batch's preferences, as the student is)."""
        assert self.hint_teacher is not None
        with torch.no_grad(), self.runtime.autocast():
            forward(self.hint_teacher, self.teacher_batch(batch))
        return self.teacher_tap.take()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def loss(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        mask, zero = batch["mask"], torch.zeros((), device=pred.device)
        a, b = self.alpha_gt, self.alpha_teacher
        # 1 per sample with a reference dose, 0 for an unlabeled patient: the teacher alone
        labeled = batch["labeled"].float().view(-1, *(1,) * (pred.dim() - 1)) if "labeled" in batch else 1.0
        w_gt = a * labeled
        if self.teacher_on == "unlabeled":
            b = b * (1 - labeled)
        blend = self.combine == "blend" and a + self.alpha_teacher > 0
        with torch.no_grad():  # logged only, over the labeled samples
            gt = masked_loss(pred, batch["target"], mask * labeled, self.kind)
        with torch.set_grad_enabled(not blend):  # logged, and in `sum` a term of the loss
            teacher = masked_loss(pred, batch["teacher"], mask, self.kind)
        if blend:
            w = w_gt + b
            target = (w_gt * batch["target"] + b * batch["teacher"]) / torch.as_tensor(w).clamp_min(1e-12)
            main = masked_loss(pred, target, mask, self.kind, weight=w)
        else:
            main = masked_loss(pred, batch["target"], mask, self.kind, weight=w_gt) + b * teacher
        # the reference where there is one, the teacher's dose for a patient without a plan
        reference = torch.where(torch.as_tensor(labeled, device=pred.device) > 0, batch["target"], batch["teacher"])
        hint = adv = d_loss = dvh = zero
        if self.dvh.weight > 0:  # `train.dvh_loss`: what the DVH score measures, per structure
            dvh = dvh_moment_loss(pred * mask, reference, batch["input"], self.dvh)
        if self.hint.weight > 0:
            hint = hint_loss(self.student_tap.take(), self.teacher_features(batch), self.adapters, self.hint_weights)
        if self.disc is not None:
            x, fake = batch["input"], pred.float() * mask
            # A patient without a plan has no reference dose (its target is zero): the teacher's
            # dose is the real one there, whatever `adversarial.real` says.
            real = batch["teacher"] if self.adv.real == "teacher" else reference
            d_loss = self.discriminator_step(x, real, fake.detach())
            self.disc.requires_grad_(False)
            adv = generator_loss(self.disc, x, fake)
            self.disc.requires_grad_(True)
        per_sample = self.hint.weight * hint + self.adv.weight * adv + self.dvh.weight * dvh
        share = torch.ones((), device=pred.device)
        if distributed.world_size() > 1:
            # The engine weights each rank's loss by its share of the batch's mask voxels, right
            # for the masked terms; the others are means over the rank's samples (equal shares).
            share = share_weight(mask).detach()
            per_sample = per_sample / share.clamp_min(1e-12)
        total = main + per_sample
        # logged as the whole batch's means once averaged over the ranks
        self.sums += torch.stack([gt * share, teacher * share, hint, adv, d_loss, dvh]).detach().float()
        self.count += 1
        return total

    def discriminator_step(self, x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One update of the discriminator on real vs `fake` (detached) doses; its loss before it."""
        assert self.disc is not None and self.d_optimizer is not None
        d_loss = discriminator_loss(self.disc, x, real, fake)
        self.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        distributed.average_gradients(self.disc.parameters())  # every rank keeps the same critic
        self.d_optimizer.step()
        return d_loss.detach()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"adapters": self.adapters.state_dict(), "term_sums": self.sums.cpu(),
                                 "term_count": self.count}
        if self.disc is not None and self.d_optimizer is not None:
            state["discriminator"] = self.disc.state_dict()
            state["d_optimizer"] = self.d_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.disc is not None) != ("discriminator" in state):
            raise NasDoseError("the checkpoint was made with another adversarial setting")
        self.adapters.load_state_dict(state.get("adapters", {}))
        if "term_sums" in state:
            self.sums.copy_(state["term_sums"])
            self.count = state["term_count"]
        if self.disc is not None and self.d_optimizer is not None:
            self.disc.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])

    def log_terms(self) -> dict[str, float]:
        """Mean of each active term since the last call, over the ranks too (collective, as the
        engine's logging is; one host sync)."""
        if not self.count:
            return {}
        means = (distributed.all_reduce(self.sums, "mean") / self.count).tolist()
        self.sums.zero_()
        self.count = 0
        active = {"gt": True, "teacher": True, "hint": self.hint.weight > 0,
                  "adversarial": self.disc is not None, "discriminator": self.disc is not None,
                  "dvh": self.dvh.weight > 0}
        return {f"loss_{name}": v for name, v in zip(TERMS, means) if active[name]}


class CascadeDistillObjective(DistillObjective):
    """Distillation of the full-resolution stage of a cascade: the student learns on source-grid
    patches (`nas_dose.cascade.patches`) whose `teacher` is the teacher cascade's dose in the same
    box, and its checkpoint is chosen on the stage's fixed validation patches (`stage`)."""

    def __init__(self, cache: Path, stage: CascadeObjective, alpha_gt: float = 1.0, alpha_teacher: float = 1.0,
                 combine: Combine = "blend") -> None:
        super().__init__(cache, alpha_gt, alpha_teacher, combine=combine)
        self.stage = stage

    def train_set(self, data: Path, config: TrainConfig) -> PatchDataset:
        cascade = self.stage.cascade
        doses = self.stage.coarse_doses if cascade.coarse_input == "predictions" else None
        dataset = PatchDataset(data, config.data.train_split, cascade, augment=config.data.augment,
                               seed=config.seed, coarse_doses=doses, teacher=self.cache)
        self.grid = dataset.grid
        return dataset

    def val_set(self, data: Path, config: TrainConfig) -> PatchDataset:
        return self.stage.val_set(data, config)
