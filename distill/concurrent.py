"""Concurrent (online) distillation, `mode: concurrent`, with privileged-input teachers (CMEDL's way).

The two-stage default first trains an ensemble to convergence, caches its predictions, then
distils them. Here the teacher's members (the architectures of the given teacher, trained from
scratch on the reference dose) and the student are trained together, in the same steps: at each
step of the training engine the objective runs every member on the batch, steps the members'
own optimizer (the student's `train.optim` and `train.schedule`, over the same steps) on their
loss to the reference dose, and hands the student their *current* weighted prediction (detached)
as its `teacher` dose and, with hints on, the current features of one member (`hint.member`,
detached) — the distillation loss is otherwise the two-stage one (`nas_dose.distill.losses`).
The members, their optimizer, schedule and gradient scaler are part of the objective's state,
so every checkpoint of the student holds them and `--resume` restores both exactly.

The members take every input channel of the data set (its extra ones too, whatever the
architectures were trained on before). A privileged teacher also sees, in training only, input
channels the student does not have (`concurrent.privileged`):
- preference values of each training plan (`[oar, hi]`; data made by `nasdose data synth
  --preferences K`, trained with `train.data.plans=true`), each scaled to [0, 1] by its range
  and given as a constant channel;
- extra input channels of the data set (`[beam_plate]`, from `data synth --beam-plates`): the
  student and its baseline train with them hidden (`train.data.hide`), the members with them.
The student learns the teacher's features through the hint adapters.

When it ends, DIR/teacher/ holds the trained members (the last weights, an ensemble.yaml for
several); a teacher without preference inputs is scored in the comparison table like a
pretrained one (one with privileged extra channels on the data set that has them), one with
preference inputs by its validation dose score given each plan's preferences.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from nas_dose import distributed
from nas_dose.config import ConfigError, to_dict
from nas_dose.data.dataset import IN_CHANNELS, DoseDataset, PlanDataset, TrainingSet, extra_inputs, make_loader
from nas_dose.data.preferences import NAMES, PREFERENCES
from nas_dose.data.store import open_data
from nas_dose.errors import input_error
from nas_dose.inference import Ensemble, save_ensemble
from nas_dose.io import load_checkpoint, load_yaml, save_checkpoint
from nas_dose.models.factory import CHECKPOINT_FORMAT, data_channels, model_from_spec
from nas_dose.runtime import Runtime
from nas_dose.search_spaces import genotype_from_dict, save_genotype
from nas_dose.training import Objective, TrainConfig, masked_loss, validate
from nas_dose.training.losses import dvh_moment_loss, share_weight
from nas_dose.training.optimization import make_optimizer, make_scheduler

from .losses import AdversarialConfig, Combine, DistillObjective, HintConfig

TEACHER_DIR = "teacher"


@dataclass
class ConcurrentConfig:
    """`members`: which members of the teacher's ensemble are trained (indices; null: all);
    `privileged`: what the teacher sees and the student does not: preference names (constant
    input channels) and extra input channels of the data set."""

    members: list[int] | None = None
    privileged: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if len(set(self.privileged)) != len(self.privileged):
            raise ConfigError(f"config key 'concurrent.privileged': a name twice in {self.privileged}")
        if self.members is not None and not self.members:
            raise ConfigError("config key 'concurrent.members': name at least one member (or null: all)")

    @property
    def preferences(self) -> list[str]:
        """The privileged preference names."""
        return [n for n in self.privileged if n in PREFERENCES]

    def channels(self, data: Path) -> list[str]:
        """The privileged extra input channels of the data set (any other name is an error)."""
        extra = extra_inputs(data)
        unknown = [n for n in self.privileged if n not in PREFERENCES and n not in extra]
        if unknown:
            raise ConfigError(f"config key 'concurrent.privileged': {', '.join(unknown)} is neither a preference "
                              f"({', '.join(NAMES)}) nor an extra input channel of {data} "
                              f"([{', '.join(extra)}])")
        return [n for n in self.privileged if n in extra]


@dataclass(frozen=True)
class Member:
    """One teacher member to train: its name, weight in the teacher, and model spec (as a
    checkpoint stores it; taking the data set's channels and the privileged preferences)."""

    name: str
    weight: float
    spec: dict[str, Any]


def teacher_members(teacher: Path, cfg: ConcurrentConfig, extra: Sequence[str] = ()) -> list[Member]:
    """The architectures of an ensemble .yaml's members (or of one run folder or checkpoint),
    their weights renormalized over `cfg.members`, taking the standard channels, the `extra`
    ones of the data set and the privileged preferences."""
    teacher = Path(teacher)
    if teacher.suffix in (".yaml", ".yml"):
        spec = load_yaml(teacher)
        entries = spec.get("members") if isinstance(spec, dict) else None
        if not isinstance(entries, list) or not all(isinstance(m, dict) and isinstance(m.get("checkpoint"), str)
                                                    for m in entries):
            raise input_error(teacher, "not a nasdose ensemble file (no members list with a checkpoint each)")
        found = [(str(m.get("name", f"member{i}")), float(m.get("weight", 1.0)), teacher.parent / m["checkpoint"])
                 for i, m in enumerate(entries)]
    else:
        found = [(TEACHER_DIR, 1.0, teacher / "best.pt" if teacher.is_dir() else teacher)]
    chosen = cfg.members if cfg.members is not None else list(range(len(found)))
    if any(not 0 <= i < len(found) for i in chosen):
        raise ConfigError(f"config key 'concurrent.members': the teacher has {len(found)} member(s), got {chosen}")
    total = sum(found[i][1] for i in chosen)
    members = []
    for i in chosen:
        name, weight, checkpoint = found[i]
        spec = copy.deepcopy(load_checkpoint(checkpoint).get("model_config"))
        if not isinstance(spec, dict):
            raise input_error(checkpoint, "not a nasdose model checkpoint")
        if spec.get("refiner") or spec.get("conditioning"):
            raise input_error(checkpoint, "a cascade's stage or a conditioned network cannot be a concurrent teacher")
        members.append(Member(name, weight / total if total > 0 else 1 / len(chosen),
                              widened(spec, extra, cfg.preferences)))
    return members


def widened(spec: dict[str, Any], extra: Sequence[str], preferences: Sequence[str]) -> dict[str, Any]:
    """`spec` taking the standard input channels, `extra` and one per preference."""
    channels = IN_CHANNELS + len(extra) + len(preferences)
    if channels != data_channels(spec):
        if spec.get("genotype") is not None:
            spec["genotype"]["macro"]["in_channels"] = channels
        else:
            spec["kwargs"]["in_channels"] = channels
    spec.pop("inputs", None)
    if extra:
        spec["inputs"] = list(extra)
    return spec


class Privileged(nn.Module):
    """A network that also sees preference values, each scaled to [0, 1] by its range and given as
    a constant channel after the input's: `forward(x, preferences)` takes every preference of
    NAMES in its own units (as a plan data set's items hold them) and uses `names`."""

    low: torch.Tensor
    high: torch.Tensor

    def __init__(self, net: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.index = [NAMES.index(n) for n in names]
        self.register_buffer("low", torch.tensor([PREFERENCES[n][0] for n in names]), persistent=False)
        self.register_buffer("high", torch.tensor([PREFERENCES[n][1] for n in names]), persistent=False)

    def forward(self, x: torch.Tensor, preferences: torch.Tensor) -> torch.Tensor:
        values = (preferences[:, self.index].float() - self.low) / (self.high - self.low)
        planes = values[:, :, None, None, None].expand(-1, -1, *x.shape[2:]).to(x.dtype)
        return self.net(torch.cat([x, planes], dim=1))


class PrivilegedPlans(PlanDataset):
    """PlanDataset's items with their plan's preferences as `privileged`, a key the training
    engine does not hand to the student (it asks a network for `preferences`)."""

    def __init__(self, path: Path, config: TrainConfig, exclude: Sequence[str]) -> None:
        super().__init__(path, config.data.train_split, augment=config.data.augment, seed=config.seed,
                         exclude=exclude, preferences=True, hide=config.data.hide)

    def patient(self, index: int, epoch: int) -> tuple[Any, dict[str, Any]]:
        patient, more = super().patient(index, epoch)
        return patient, {"privileged": more["preferences"]}


def build_members(members: Sequence[Member], preferences: Sequence[str], seed: int) -> list[nn.Module]:
    """Each member freshly initialized from (seed, its index), leaving the global RNGs alone;
    given the privileged `preferences`."""
    nets = []
    for i, m in enumerate(members):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1_000_003 * (seed + 1) + i)
            net = model_from_spec(m.spec)
        nets.append(Privileged(net, preferences) if preferences else net)
    return nets


class ConcurrentObjective(DistillObjective):
    """The distillation objective whose teacher trains beside the student (module docstring);
    `preferences`: the privileged ones (the privileged extra channels are the student's
    `train.data.hide`)."""

    def __init__(self, members: Sequence[Member], preferences: Sequence[str], seed: int, alpha_gt: float = 1.0,
                 alpha_teacher: float = 1.0, hint: HintConfig | None = None,
                 adversarial: AdversarialConfig | None = None, combine: Combine = "blend") -> None:
        self.members, self.preferences = list(members), list(preferences)
        nets = build_members(members, preferences, seed)
        self.nets = nn.ModuleList(nets)
        hint = hint or HintConfig()
        index = hint.member if hint.member is not None else max(range(len(members)), key=lambda i: members[i].weight)
        if not 0 <= index < len(members):
            raise ConfigError(f"config key 'hint.member': the teacher has {len(members)} members, got {index}")
        chosen = nets[index]
        inner = chosen.net if isinstance(chosen, Privileged) else chosen
        super().__init__(Path(), alpha_gt, alpha_teacher, hint, adversarial, hint_teacher=inner, combine=combine)

    def train_set(self, data: Path, config: TrainConfig) -> TrainingSet:
        if self.preferences:
            if not config.data.plans:
                raise ConfigError("config key 'concurrent.privileged': the preferences are those of each plan: set "
                                  "train.data.plans=true (data from `nasdose data synth --preferences K`)")
            with open_data(data) as d:
                held_out = config.data.held_out(d.ids(config.data.train_split))
            dataset: TrainingSet = PrivilegedPlans(data, config, held_out)
        else:
            dataset = Objective.train_set(self, data, config)
        assert isinstance(dataset, DoseDataset)
        self.dataset = dataset
        self.keep(dataset)
        return dataset

    def teacher_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        [shape] = super().teacher_shapes(input_shape)
        return [(shape[0], shape[1] + len(self.preferences), *shape[2:])]

    def bind_teacher(self, teacher: nn.Module) -> None:
        """The hint member trains: its features are taken from its training forward pass."""

    def bind(self, model: nn.Module, runtime: Runtime, config: TrainConfig) -> None:
        super().bind(model, runtime, config)
        self.nets.to(runtime.device).train()
        self.t_optimizer = make_optimizer(list(self.nets.parameters()), config.optim)
        steps_per_epoch = config.steps_per_epoch or len(make_loader(self.dataset, config.data.batch_size,
                                                                    shuffle=True, seed=config.seed, shard="even"))
        self.t_scheduler = make_scheduler(self.t_optimizer, config.schedule, config.epochs * steps_per_epoch,
                                          steps_per_epoch)
        self.t_scaler = runtime.grad_scaler()
        self.member_sums = torch.zeros(len(self.nets), device=runtime.device)

    def teacher_features(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The hint member's features from this step's forward pass (in `loss`), detached."""
        return [f.detach() for f in self.teacher_tap.take()]

    def loss(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """One step of the members on the reference dose, then the student's loss with their
        current prediction as its teacher."""
        extra = (batch["privileged"],) if self.preferences else ()
        target, mask, x = batch["target"], batch["mask"], self.teacher_batch(batch)["input"]
        with self.runtime.autocast():
            outs = [net(x, *extra) for net in self.nets]
        losses = torch.stack([masked_loss(o, target, mask, self.kind) for o in outs])
        total = losses.sum()
        if self.dvh.weight:
            total = total + self.dvh.weight * sum(dvh_moment_loss(o * mask, target, batch["input"], self.dvh)
                                                  for o in outs)
        if distributed.world_size() > 1:
            total = total * share_weight(mask)
        self.t_optimizer.zero_grad(set_to_none=True)
        self.t_scaler.scale(total).backward()
        distributed.average_gradients(self.nets.parameters())
        self.t_scaler.step(self.t_optimizer)
        self.t_scaler.update()
        self.t_scheduler.step()
        self.member_sums += losses.detach().float()
        with torch.no_grad():
            teacher = sum(m.weight * o.float().clamp_min(0) for m, o in zip(self.members, outs))
        return super().loss(pred, {**batch, "teacher": teacher * mask})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "members": self.nets.state_dict(),
                "t_optimizer": self.t_optimizer.state_dict(), "t_scheduler": self.t_scheduler.state_dict(),
                "t_scaler": self.t_scaler.state_dict(), "member_sums": self.member_sums.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.nets.load_state_dict(state["members"])
        self.t_optimizer.load_state_dict(state["t_optimizer"])
        self.t_scheduler.load_state_dict(state["t_scheduler"])
        self.t_scaler.load_state_dict(state["t_scaler"])
        self.member_sums.copy_(state["member_sums"])

    def log_terms(self) -> dict[str, float]:
        """The distillation terms, and each member's mean loss to the reference (`loss_member_NAME`)."""
        count = self.count
        terms = super().log_terms()
        if not count:
            return terms
        means = (distributed.all_reduce(self.member_sums, "mean") / count).tolist()
        self.member_sums.zero_()
        return {**terms, **{f"loss_member_{m.name}": v for m, v in zip(self.members, means)}}


def save_teacher(folder: Path, members: Sequence[Member], preferences: Sequence[str], run: Path,
                 config: TrainConfig, grid: int) -> Path:
    """Write the members trained beside the student (their weights from the student run's last
    checkpoint) as run folders under `folder`/members, with an ensemble.yaml for several; returns
    what `nasdose predict` takes (the ensemble.yaml, or the one member's folder)."""
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    state = ckpt["objective"]["members"]
    for i, m in enumerate(members):
        prefix = f"{i}.net." if preferences else f"{i}."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        member = folder / "members" / m.name
        if m.spec.get("genotype") is not None:
            save_genotype(member / "genotype.yaml", genotype_from_dict(m.spec["genotype"]))
        save_checkpoint(member / "best.pt", {
            "format": CHECKPOINT_FORMAT, "model_config": m.spec, "config": to_dict(config), "grid": grid,
            "model": weights, "epoch": ckpt["epoch"], "step": ckpt["step"]})
    if len(members) == 1:
        return folder / "members" / members[0].name
    save_ensemble(folder / "ensemble.yaml", [m.name for m in members], [m.weight for m in members],
                  selection="concurrent", combination="weights of the given teacher", tta=False)
    return folder / "ensemble.yaml"


def privileged_score(folder: Path, members: Sequence[Member], preferences: Sequence[str], data: Path,
                     config: TrainConfig, runtime: Runtime) -> float:
    """The validation dose score (Gy, on the data set's grid) of the teacher given `preferences`,
    each validation plan predicted given its own (and every channel of the data set)."""
    nets = []
    for m in members:
        net = model_from_spec(m.spec)
        net.load_state_dict(load_checkpoint(folder / "members" / m.name / "best.pt")["model"])
        nets.append(Privileged(net, preferences))
    teacher = Ensemble(nets, [m.weight for m in members]).to(runtime.device)
    plans = PlanDataset(data, config.data.val_split, every_plan=True, preferences=True)
    return validate(teacher, make_loader(plans, config.data.batch_size, shuffle=False, shard="exact"), runtime)[0]
