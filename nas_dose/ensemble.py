"""Train a pool's members, choose and weight them on validation patients, save the ensemble.

  nasdose ensemble POOL.yaml --data DATA.h5 --out DIR [--config CFG.yaml] [--resume] [key=value ...]

DIR receives:
  members/<name>/   one training run per pool member (genotype.yaml, best.pt, checkpoints/,
                    log.jsonl, config.yaml); validation.h5 (or validation_tta.h5), its
                    validation predictions, made once and cached for selection and weighting;
                    metrics.json, its training record plus its validation scores
  ensemble.yaml     the members kept with their weights, genotype files and checkpoints:
                    `nasdose predict --model DIR/ensemble.yaml` predicts with the ensemble
  validation.h5     the ensemble's validation predictions
  metrics.json      dose and DVH scores with the per-structure table, each member's scores,
                    the members' pairwise diversity, the scores as members are added
  plots/            size_curve.png, diversity.png, DVH and dose-slice plots of a few patients
  config.yaml       the resolved config

Every choice is made on the validation split: each member's checkpoint (by the training
engine), which members are kept and their weights; test patients are never used. Scored on
the patients they were chosen on, the ensemble's validation scores flatter it, so metrics.json
also holds a leave-one-patient-out estimate: selection and weights redone without each
validation patient, then scored on it.

With `conditioning: film` (and `train.data.plans: true`) every member is conditioned on the
planning preferences (docs/how-to/preferences.md): the members learn from the preference plans,
and their validation predictions, the selection, the weights and the scores are made on every plan
of each validation patient (one scored item per plan, asked for its preferences, on the data
set's grid, where the plans are stored; the leave-one-patient-out estimate leaves out all plans of
a patient at once). validation.h5 then holds one dose per plan, named `PATIENT#planK`, and the
evaluation's plots are not drawn. Validation patients without preference plans (OpenKBP's) are one
plan each, their own dose: each member is asked for the patient's own measured preferences
(`nasdose predict --preference measured`), and from there on the ensemble is chosen and scored as
a plain one (on a resampled data set: selected on the data set's grid, every score reported
official, on the source grid; metrics.json `preferences: measured`). The ensemble.yaml of
conditioned members predicts as a conditioned model (`nasdose predict --preference`, `nasdose
view`, and a teacher for `nasdose distill`).

--resume continues an interrupted run: finished members are reused, a half-trained one resumes
from its last checkpoint, and changed selection settings are applied without retraining.

A pool searched with `conditioning` (`nasdose search` with `conditioning: film`) records it: its
members are conditioned so and train on the preference plans without these two keys.

`init: inherit` starts each member from its weights in the search's trained SPOS supernet
(`_supernet_file`: the search's supernet.pt beside pool.yaml, or the file its
`evaluator.supernet` named) and fine-tunes it with `train`: the supernet fixed to the member's
genotype, copied into the plain network built from the genotype
(`strategies.evaluator.inherited_weights`); `scratch` (the default) starts from a seeded random
initialization. benchmarks/bench_inherit.py measures what it saves. A conditioned member inherits
only from a conditioned search's supernet (its FiLM layers and embedding included).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from torch import nn

from nas_dose.search_spaces import Genotype, load_genotype, save_genotype
from nas_dose.strategies.evaluator import SUPERNET_FILE, inherited_weights

from . import distributed
from .cascade.objective import CascadeObjective
from .cascade.patches import CascadeConfig, recorded_absolute
from .cascade.windows import source_grids
from .config import ConfigError, at_least, check_run_folder, from_dict, save_config
from .data.dataset import PlanItem, extra_inputs, plan_items, plan_reference
from .data.preferences import MEASURED, NAMES
from .data.store import DataFile, open_data, write_predictions
from .errors import input_error
from .evaluate import evaluate_predictions
from .inference import (
    Cascade,
    Ensemble,
    as_predictor,
    open_for,
    predict_plans,
    predictions,
    save_ensemble,
    score_plans,
)
from .io import load_json, output_folder, save_json
from .models.conditioning import KINDS, conditioning_spec
from .models.factory import ModelConfig, build_model, load_model
from .models.refiner import Refiner
from .parallel import run_side_by_side, worker_threads
from .plots import new_figure, save_figure
from .pool import MATRICES, Pool, diversity_key, load_pool
from .pool.plots import plot_diversity
from .progress import say
from .runtime import Runtime, RuntimeConfig, seed_everything
from .scores import Scores, score_on_source
from .selection import (
    Selection,
    SelectionConfig,
    ValidationPredictions,
    diversity_matrices,
    leave_one_patient_out,
    select,
)
from .training import TrainConfig, train_model


@dataclass
class EnsembleConfig:
    """Member training (`train`, whose model comes from the pool), selection and combination.

    Member i trains with seed `seed` + i, and every network runs with `runtime`: set them here,
    not under `train`. `parallel` members train at once, each in its own process with its share
    of `runtime.threads` (nas_dose.parallel: faster on a CPU, where small networks gain little
    from a second thread); not under torchrun, whose ranks already share the members. With
    `train.cascade.coarse` every member is the full-resolution stage of a cascade refining that
    coarse model: members are chosen and scored on the source grid, and ensemble.yaml predicts as
    a cascade whose stage is the members' weighted mean. A pool searched for a cascade's stage
    (`search … cascade.coarse`) trains so without it (with it, only if it names the same model).
    `conditioning` (e.g. film) conditions every member on the planning preferences; it needs
    `train.data.plans`, and members are then chosen and weighted on every plan of each
    validation patient.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    tta: bool = False
    seed: int = 0
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    plots: int = 3
    parallel: int = 1
    conditioning: str | None = None
    init: Literal["scratch", "inherit"] = "scratch"  # members' first weights: random, or the supernet's

    def validate(self) -> None:
        for key, default in (("model", ModelConfig()), ("runtime", RuntimeConfig()), ("seed", 0)):
            if getattr(self.train, key) != default:
                where = "comes from the pool" if key == "model" else f"is set by the top-level '{key}'"
                raise ConfigError(f"config key 'train.{key}': a member's {key} {where}; leave it out")
        if self.train.prior.epochs:
            raise ConfigError("config key 'train.prior.epochs': members are genotype networks, which have no dose "
                              "prior; train a model that has one (latent_dose_net) with nasdose train")
        at_least("seed", self.seed, 0)
        at_least("plots", self.plots, 0)
        at_least("parallel", self.parallel, 1)
        if self.conditioning is not None:
            if self.conditioning not in KINDS:
                raise ConfigError(f"config key 'conditioning': expected one of {', '.join(KINDS)} (or none), "
                                  f"got {self.conditioning!r}")
            if not self.train.data.plans:
                raise ConfigError("config key 'conditioning': conditioned members learn from preference plans: "
                                  "set train.data.plans=true (data from `nasdose data synth --preferences K`)")
            if self.train.cascade.coarse is not None:
                raise ConfigError("config key 'conditioning': a cascade's full-resolution stage cannot be "
                                  "conditioned (condition its coarse stage)")


# ---------------------------------------------------------------------------------------------
# Members: training and cached validation predictions.

@dataclass
class _Member:
    name: str
    folder: Path
    genotype: Genotype
    search_score: float

    def cache(self, tta: bool) -> Path:
        return self.folder / ("validation_tta.h5" if tta else "validation.h5")


def _members(pool_path: Path, out: Path) -> tuple[Pool, list[_Member]]:
    pool = load_pool(pool_path)
    members = []
    for m in pool.members:
        if "/" in m.name or "\\" in m.name or m.name in (".", "..") or m.name.startswith("."):
            raise input_error(pool_path, f"member name {m.name!r} cannot name a folder")
        members.append(_Member(m.name, out / "members" / m.name, m.genotype, m.search_score))
    return pool, members


def _pool_cascade(cfg: EnsembleConfig, pool: Pool, pool_path: Path) -> EnsembleConfig:
    """The members of a pool searched for a cascade's stage train as stages of that cascade: with
    the search's `cascade` section, or with `train.cascade` when it names the same coarse stage."""
    if pool.cascade is None:
        return cfg
    own, coarse = cfg.train.cascade, pool.cascade["coarse"]
    if cfg.conditioning is not None:  # validate() sees only train.cascade, not the pool's
        raise input_error(pool_path, f"its members are stages refining {coarse}, and a cascade's full-resolution "
                                     "stage cannot be conditioned: leave conditioning out")
    if own.coarse is None:
        if own != CascadeConfig():
            raise input_error(pool_path, f"its members are stages refining {coarse}: set train.cascade.coarse "
                                         "with the other train.cascade keys, or leave them all out")
        try:
            searched = from_dict(CascadeConfig, pool.cascade, prefix="cascade")
        except ConfigError as e:
            raise input_error(pool_path, str(e)) from None
        return replace(cfg, train=replace(cfg.train, cascade=searched))
    if Path(own.coarse).resolve() != Path(coarse).resolve():
        raise input_error(pool_path, f"its members were searched as stages refining {coarse}, but "
                                     f"train.cascade.coarse is {own.coarse}")
    return cfg


def _recorded_absolute(old: dict[str, Any]) -> dict[str, Any]:
    """An ensemble's config.yaml with train.cascade's paths absolute (older runs kept them as given)."""
    train = old["train"]
    return {**old, "train": {**train, "cascade": recorded_absolute(train["cascade"])}} if "cascade" in train else old


def _pool_conditioning(cfg: EnsembleConfig, pool: Pool, pool_path: Path) -> EnsembleConfig:
    """The members of a pool searched conditioned (`search … conditioning=film`) train conditioned
    so, on the preference plans (a conditioned network learns from nothing else)."""
    if pool.conditioning is None:
        return cfg
    if cfg.conditioning not in (None, pool.conditioning):
        raise input_error(pool_path, f"its members were searched with conditioning {pool.conditioning}, but "
                                     f"conditioning is {cfg.conditioning}")
    return replace(cfg, conditioning=pool.conditioning,
                   train=replace(cfg.train, data=replace(cfg.train.data, plans=True)))


def _member_config(cfg: EnsembleConfig, member: _Member, index: int, space: str) -> TrainConfig:
    model = ModelConfig(name=space, genotype=str(member.folder / "genotype.yaml"), conditioning=cfg.conditioning)
    return replace(cfg.train, model=model, seed=cfg.seed + index, runtime=cfg.runtime)


def _place_genotype(member: _Member, pool_path: Path) -> None:
    """The member's genotype file; on resume it must be the genotype the member was trained as."""
    file = member.folder / "genotype.yaml"
    if file.exists():
        if load_genotype(file).key() != member.genotype.key():
            raise input_error(pool_path, f"member {member.name}: its genotype differs from the one "
                                         f"{member.folder} was trained as (choose another --out)")
        return
    save_genotype(file, member.genotype)


def _supernet_file(cfg: EnsembleConfig, pool: Pool, pool_path: Path) -> Path | None:
    """The supernet file members inherit from (`init: inherit`), or None (`scratch`)."""
    if cfg.init == "scratch":
        return None
    if cfg.conditioning is not None and pool.conditioning is None:
        raise input_error(pool_path, "init=inherit: a conditioned member has no weights in the supernet of a plain "
                                     "search (its FiLM layers are new); use init=scratch, or search with "
                                     "conditioning")
    given = ((pool.config or {}).get("options") or {}).get("evaluator", {}).get("supernet")
    path = Path(given) if given else pool_path.parent / SUPERNET_FILE
    if not path.is_file():
        raise input_error(pool_path, f"init=inherit: no trained supernet at {path} (a search whose evaluator "
                                     "has mode inherit or finetune writes one beside its pool.yaml)")
    return path


def _inherit(model: nn.Module, supernet: Path, genotype: Genotype, conditioning: str | None) -> None:
    """Load the member's inherited weights into its network (a cascade stage's: inside its
    Refiner; a conditioned one's: with the conditioned supernet's embedding)."""
    net = model.net if isinstance(model, Refiner) else model
    spec = None if conditioning is None else conditioning_spec(conditioning, NAMES)
    try:
        net.load_state_dict(inherited_weights(supernet, genotype, spec))
    except RuntimeError as e:
        raise input_error(supernet, f"its weights do not fit the member's network ({str(e).splitlines()[0]})") from None


def _trained(member: _Member) -> bool:
    return (member.folder / "metrics.json").exists()  # the training's record is written last


def _train_member(cfg: EnsembleConfig, member: _Member, index: int, space: str, data: Path,
                  supernet: Path | None = None) -> None:
    """Train the member (from `supernet`'s weights for it, if given), or continue it from its
    checkpoint; a finished one is left alone."""
    if _trained(member):
        return
    config = _member_config(cfg, member, index, space)
    cascade = config.cascade.coarse is not None
    seed_everything(config.seed)
    model = build_model(config.model, refiner=cascade, extra=extra_inputs(data, config.data.hide))
    if supernet is not None:
        _inherit(model, supernet, member.genotype, config.model.conditioning)
    objective = CascadeObjective(config, data) if cascade else None
    train_model(model, config, data, member.folder, resume=True, objective=objective)


def _predict_member(member: _Member, data: Path, ids: list[str], runtime: Runtime, tta: bool,
                    items: Sequence[PlanItem] | None) -> None:
    """Cache the member's validation predictions (its best checkpoint, as the ensemble runs it):
    on the data set's grid, or on the source grid for the full-resolution stage of a cascade; a
    conditioned member's for each plan item (`items`), asked for its preferences."""
    with open_for(data, member.folder) as d:
        model, _ = load_model(member.folder)
        # clamped, then flip-averaged: as the ensemble runs it
        member_net = runtime.prepare(Ensemble([model], [1.0], tta)).eval()
        predictor = as_predictor(member.folder, model, runtime, d.grid) if isinstance(model, Refiner) else member_net
        if items is not None:  # a conditioned member (never a cascade's stage)
            grid, doses = d.grid, predict_plans(member_net, d, items, runtime)
            records = ((key, dose, d.patient_attrs(item.pid)) for item, (key, dose) in zip(items, doses))
        else:
            grid, doses = predictions(predictor, d, ids, runtime, tta and isinstance(predictor, Cascade))
            records = ((pid, dose, d.patient_attrs(pid)) for pid, dose in doses)
        total = len(ids) if items is None else len(items)
        write_predictions(member.cache(tta), records, grid=grid, source=f"{member.folder} (tta={tta})", total=total)


def _cache_is_complete(path: Path, keys: list[str]) -> bool:
    if not path.exists():
        return False
    with open_data(path) as f:
        return f.kind == "predictions" and set(keys) <= set(f.ids())


def _validation_predictions(members: Sequence[_Member], data: Path, ids: list[str], tta: bool,
                            items: Sequence[PlanItem] | None) -> ValidationPredictions:
    """The members' cached predictions with the references: per patient, or per plan item."""
    with ExitStack() as stack:
        ref = stack.enter_context(open_data(data))
        caches = [stack.enter_context(open_data(m.cache(tta))) for m in members]
        if len({c.grid for c in caches}) > 1:
            raise input_error(data, "the members predict different grids (whole-volume networks and cascades mixed)")
        read = ref.read if caches[0].grid == ref.grid else ref.read_source  # a cascade's: the source grid
        references = ((pid, read(pid)) for pid in ids) if items is None else (
            (item.key, plan_reference(ref, item)) for item in items)

        def patients() -> Iterator[tuple[str, np.ndarray, np.ndarray, list[np.ndarray]]]:
            for key, p in references:
                if p.dose is None:
                    raise input_error(data, f"validation patient {key} has no reference dose")
                yield key, p.dose, p.possible_dose_mask, [c.read_dose(key) for c in caches]

        return ValidationPredictions.from_patients([m.name for m in members], patients())


# ---------------------------------------------------------------------------------------------
# Scoring and reporting.

def _score(vp: ValidationPredictions, data: Path, weights: np.ndarray,
           items: Sequence[PlanItem] | None = None) -> Scores:
    """Official dose and DVH scores of a combination (on the source grid; plan items: against
    their plans, on the data set's grid); `weights` (members,) or one row per patient (item)."""
    rows = np.broadcast_to(np.asarray(weights, dtype=np.float64), (len(vp.ids), vp.n_members))
    doses = ((pid, vp.full_dose(rows[p], p)) for p, pid in enumerate(vp.ids))
    with open_data(data) as d:
        return score_on_source(d, doses) if items is None else score_plans(d, items, doses)


def _best_single(vp: ValidationPredictions) -> np.ndarray:
    """Weights that pick the member with the best validation dose score."""
    return np.eye(vp.n_members)[int(np.argmin(vp.member_scores()))]


def _named(names: Sequence[str], weights: np.ndarray) -> dict[str, float]:
    return {n: float(w) for n, w in zip(names, weights) if w > 0}


def _plot_size_curve(curve: list[dict[str, Any]], best: dict[str, Any], size: int,
                     loo: dict[str, Any] | None, path: Path) -> None:
    fig, axes = new_figure(ncols=2, panel_inches=(4.8, 3.8))
    sizes = [c["size"] for c in curve]
    for ax, key, label in ((axes[0, 0], "dose_score", "dose score (Gy)"),
                           (axes[0, 1], "dvh_score", "DVH score (Gy)")):
        ax.plot(sizes, [c[key] for c in curve], marker="o", label="ensemble (validation, in-sample)")
        ax.axhline(best[key], color="0.4", linestyle="--", label=f"best member ({best['name']})")
        ax.axvline(size, color="C2", linestyle=":", label=f"kept: {size} pick(s)")
        if loo is not None:
            ax.plot([size], [loo[key]], marker="s", color="C3", linestyle="none",
                    label="kept, leave-one-patient-out")
        ax.set_xticks(sizes, [f"{c['size']}\n{c['added']}" for c in curve], fontsize="x-small")
        ax.set_xlabel("picks (member added)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="x-small", frameon=False)
    save_figure(fig, path)


def _scores(cfg: EnsembleConfig, vp: ValidationPredictions, data: Path, genotypes: Sequence[Genotype],
            sel: Selection, items: Sequence[PlanItem] | None) -> dict[str, Any]:
    """Each member's scores, the size curve, and the leave-one-patient-out estimates of the
    whole procedure and of its baseline, picking the best single member (plan items: all plans
    of the left-out patient left out)."""
    names = vp.names
    members = {n: _score(vp, data, np.eye(vp.n_members)[i], items) for i, n in enumerate(names)}
    best = min(names, key=lambda n: members[n].dose_score)
    patients = None if items is None else [item.pid for item in items]
    curve = []
    for k, w in enumerate(sel.prefix_weights, start=1):
        s = _score(vp, data, w, items)
        curve.append({"size": k, "added": names[sel.order[k - 1]], "weights": _named(names, w),
                      "dose_score": s.dose_score, "dvh_score": s.dvh_score})
    out: dict[str, Any] = {
        "members": members, "size_curve": curve,
        "best_member": {"name": best, "dose_score": members[best].dose_score,
                        "dvh_score": members[best].dvh_score},
        "validation_leave_one_patient_out": None, "best_member_leave_one_patient_out": None}
    if len(set(patients or vp.ids)) >= 2:
        rows = leave_one_patient_out(vp, lambda sub: select(sub, cfg.selection, genotypes).weights, patients)
        s = _score(vp, data, rows, items)
        out["validation_leave_one_patient_out"] = {
            "dose_score": s.dose_score, "dvh_score": s.dvh_score, "per_patient": s.per_patient,
            "weights": {pid: _named(names, r) for pid, r in zip(vp.ids, rows)}}
        rows = leave_one_patient_out(vp, _best_single, patients)
        s = _score(vp, data, rows, items)
        out["best_member_leave_one_patient_out"] = {
            "dose_score": s.dose_score, "dvh_score": s.dvh_score,
            "picked": {pid: names[int(np.argmax(r))] for pid, r in zip(vp.ids, rows)}}
    return out


NOTES = {
    "validation_in_sample": "the members kept, their number and weights were chosen on these same validation "
                            "patients: optimistic",
    "validation_leave_one_patient_out": "selection and weights redone without each validation patient, then "
                                        "scored on it: the estimate for unseen patients",
    "best_member": "the best single member on validation (in-sample); best_member_leave_one_patient_out picks it "
                   "without the scored patient: the baseline to compare the ensemble's estimate with",
}


def _report(cfg: EnsembleConfig, pool: Pool, members: Sequence[_Member], vp: ValidationPredictions,
            data: Path, out: Path, items: Sequence[PlanItem] | None) -> dict[str, Any]:
    """Select and weight; write ensemble.yaml, validation.h5, the metrics and the plots."""
    names = vp.names
    genotypes = [m.genotype for m in members]
    matrices = diversity_matrices(vp, genotypes)
    sel = select(vp, cfg.selection, genotypes, matrices)
    scores = _scores(cfg, vp, data, genotypes, sel, items)
    kept = [i for i in range(vp.n_members) if sel.weights[i] > 0]
    save_ensemble(out / "ensemble.yaml", [names[i] for i in kept], [sel.weights[i] for i in kept],
                  selection=cfg.selection.method, combination=cfg.selection.combination, tta=cfg.tta)
    pids = vp.ids if items is None else [item.pid for item in items]
    with open_data(data) as d:
        write_predictions(out / "validation.h5",
                          ((key, vp.full_dose(sel.weights, p), d.patient_attrs(pid))
                           for p, (key, pid) in enumerate(zip(vp.ids, pids))),
                          grid=_validation_grid(cfg, d, pids), source=str(out / "ensemble.yaml"), total=len(vp.ids))
    split = cfg.train.data.val_split
    in_sample = (evaluate_predictions(out / "validation.h5", data, out, split=split, plots=cfg.plots)
                 if items is None else _score(vp, data, sel.weights, items))
    plot_diversity(names, matrices, out / "plots" / "diversity.png")
    _plot_size_curve(scores["size_curve"], scores["best_member"], sel.size,
                     scores["validation_leave_one_patient_out"], out / "plots" / "size_curve.png")
    member_scores: dict[str, Scores] = scores.pop("members")
    metrics = {
        "data": str(data), "split": split, "patients": list(dict.fromkeys(pids)), "notes": NOTES,
        **({} if items is None else {"plans": vp.ids}),
        **({"preferences": MEASURED} if items is None and cfg.conditioning is not None else {}),
        "ensemble": {"selection": cfg.selection.method, "combination": cfg.selection.combination,
                     "tta": cfg.tta, "picks": [names[i] for i in sel.order[:sel.size]],
                     "weights": _named(names, sel.weights)},
        "validation_in_sample": in_sample.to_dict(),
        **scores,
        "members": {n: {"dose_score": member_scores[n].dose_score, "dvh_score": member_scores[n].dvh_score,
                        "search_score": members[i].search_score, "weight": float(sel.weights[i])}
                    for i, n in enumerate(names)},
        "diversity": {"members": names, "measure": diversity_key(matrices),
                      "validation": {k: np.asarray(matrices[k]).tolist() for k in MATRICES},
                      "search": {k: np.asarray(pool.matrices[k]).tolist() for k in MATRICES},
                      "search_predictions": pool.predictions},
    }
    save_json(out / "metrics.json", metrics)
    for i, m in enumerate(members):
        record = load_json(m.folder / "metrics.json")
        record["validation"] = {"split": split, "tta": cfg.tta, **{
            k: v for k, v in member_scores[names[i]].to_dict().items() if k != "table"}}
        save_json(m.folder / "metrics.json", record)
    return metrics


def _validation_grid(cfg: EnsembleConfig, data: DataFile, ids: list[str]) -> int:
    """The grid of the ensemble's validation predictions: a cascade's is the source grid."""
    return data.grid if cfg.train.cascade.coarse is None else data.grid * source_grids(data, ids)


# ---------------------------------------------------------------------------------------------
# The run.

Config = EnsembleConfig


@dataclass(frozen=True)
class Inputs:
    pool: Path  # a pool file (nasdose search)
    data: Path  # a nasdose data set


def run(config: EnsembleConfig, inputs: Inputs, out: Path, resume: bool = False, *,
        force: bool = False) -> dict[str, Any]:
    """Train (or reuse) every member, cache, select, weight, report into `out`; returns the metrics.
    `force`: an earlier run in `out` is removed first (none of its members is reused)."""
    with output_folder(out, replace=force):
        return _run(inputs.pool, inputs.data, Path(out), config, resume)


def _run(pool_path: Path, data: Path, out: Path, cfg: EnsembleConfig, resume: bool) -> dict[str, Any]:
    pool_path, data = Path(pool_path), Path(data)
    pool, members = _members(pool_path, out)
    cfg = _pool_conditioning(_pool_cascade(cfg, pool, pool_path), pool, pool_path)
    cfg = replace(cfg, train=replace(cfg.train, cascade=cfg.train.cascade.resolved()))
    split = cfg.train.data.val_split
    with open_data(data) as d:
        if d.kind != "dataset":
            raise input_error(data, f"a nasdose {d.kind} file, expected a data set")
        ids = d.ids(split)
        items = plan_items(d, ids) if cfg.conditioning is not None else None
    if not ids:
        raise input_error(data, f"no patients in split '{split}' to select the members on")
    keys = ids if items is None else [item.key for item in items]
    plans = _scored_plans(items)
    # one rank checks, or another may see its config; the members' training must stay as it was
    supernet = _supernet_file(cfg, pool, pool_path)
    distributed.on_main(check_run_folder, out, cfg, resume, "an ensemble run", out / "members",
                        ("train", "seed", "conditioning", "init"), _recorded_absolute)
    save_config(out / "config.yaml", cfg)
    runtime = Runtime(cfg.runtime)

    def member(job: tuple[int, _Member]) -> None:
        i, m = job
        _place_genotype(m, pool_path)
        say(f"member {i + 1}/{len(members)}: {m.name}")
        _train_member(cfg, m, i, pool.space, data, supernet)
        if not _cache_is_complete(m.cache(cfg.tta), keys):
            _predict_member(m, data, ids, runtime, cfg.tta, items)

    def report() -> dict[str, Any]:
        vp = _validation_predictions(members, data, ids, cfg.tta, plans)
        return _report(cfg, pool, members, vp, data, out, plans)

    if cfg.parallel > 1:
        _train_side_by_side(cfg, pool_path, pool.space, members, data, supernet)
    # Members are independent: under torchrun each rank trains its share alone; then the main
    # rank, which reads every member's files, chooses and writes the ensemble.
    distributed.map_shards(member, list(enumerate(members)))
    metrics = distributed.on_main(report)
    loo = metrics["validation_leave_one_patient_out"]
    best = metrics["best_member"]
    where = ("OpenKBP, source grid" + (", each patient at its own measured preferences" if items else "")
             if plans is None else f"on each of {len(plans)} plans, the data set's grid")
    say(f"ensemble of {', '.join(f'{n} × {w:.2f}' for n, w in metrics['ensemble']['weights'].items())}: "
        f"validation dose score ({where}) {metrics['validation_in_sample']['dose_score']:.3f} Gy in-sample"
        + (f", {loo['dose_score']:.3f} Gy leave-one-patient-out" if loo else "")
        + f"; best member {best['name']} {best['dose_score']:.3f} Gy. Wrote {out / 'ensemble.yaml'}")
    return metrics


def _scored_plans(items: Sequence[PlanItem] | None) -> Sequence[PlanItem] | None:
    """The plan items that are scored against their own plans, on the data set's grid (where
    preference plans are stored); None where every item is a patient's own dose at its measured
    preferences (or the members are plain): each is then a patient, chosen and scored as a plain
    ensemble's, officially on the source grid."""
    return items if items is not None and any(item.plan is not None for item in items) else None


def _train_side_by_side(cfg: EnsembleConfig, pool_path: Path, space: str, members: Sequence[_Member],
                        data: Path, supernet: Path | None) -> None:
    """The untrained members, `cfg.parallel` at once in their own processes (nas_dose.parallel)."""
    todo = [(i, m) for i, m in enumerate(members) if not _trained(m)]
    if not todo:
        return
    for _, m in todo:
        _place_genotype(m, pool_path)
    workers = min(cfg.parallel, len(todo))
    share = replace(cfg, runtime=replace(cfg.runtime, threads=worker_threads(workers, cfg.runtime.threads)))
    say(f"training members {', '.join(m.name for _, m in todo)}, {workers} at a time "
        f"({share.runtime.threads} thread(s) each)")

    def done(job: int, _: None) -> None:
        i, m = todo[job]
        record = load_json(m.folder / "metrics.json")
        say(f"member {i + 1}/{len(members)}: {m.name} trained in {record['seconds'] / 60:.1f} min")

    run_side_by_side(_train_member, [(share, m, i, space, data, supernet) for i, m in todo], workers, done=done)
