"""Search architectures and choose an accurate, diverse pool of K networks.

  nasdose search --data DATA.h5 --out DIR [--config CFG.yaml] [--resume] [key=value ...]

Weights are trained on one part of the training split and architectures chosen and scored on
the other (disjoint); the members' predictions on the validation split measure how they differ.
Diversity modes: "sequential" runs K searches in a row, each with the LENAS hinge against the
members found before it; "pool" runs one search and picks K of its candidates greedily for
accuracy + lam × diversity; "none" takes the K best.

Sequential mode, search k (0-based): its seed is `search_seed(seed, k)` (the run's seed for the
first, so that it is the search a lone run makes; one derived from (seed, k) for the others), so
each search draws its own genotypes, and a resumed run derives the same. Its references are the
predictions (architecture and diversity patients) of members 0..k-1, the networks each was scored
with. The scoring strategies' evaluator is shared by the K searches (strategies/evaluator.py):
the SPOS supernet is trained once, and a genotype already scored is not scored again, while the
hinge against the new references is computed anew. The member is chosen among the candidates
not yet in the pool: the one of least score + weight × mean hinge, where a candidate's hinge to
a reference is max(0, margin − mean disagreement) over the patients it predicted (ties: the
more accurate), except for a strategy that trains against the references and answers first
(differentiable with `derive: argmax`), whose answer is the member. The hinge was *inactive* for
search k when it changed nothing: for a chosen-by-objective member, when the member is the most
accurate new candidate (in particular when every candidate's hinge term is zero, all at least
`margin` away from every reference); for an answer-first strategy, when its hinge was zero at
every architecture step (α never felt it). search_log.jsonl records each search's seed
(`sequential_search`) and a `hinge` record (active, the candidates' hinge terms, the member and
the most accurate new candidate); an inactive hinge is also said on the console.

DIR receives config.yaml, search_log.jsonl, pool.yaml (read by `nasdose ensemble`),
genotypes/<member>.yaml and plots/ (arch_weights.png, fitness.png, diversity.png); a search
whose evaluator trains SPOS supernets (mode inherit or finetune) also supernet.pt, which later searches
reuse with `options.evaluator.supernet=DIR/supernet.pt` and from which `nasdose ensemble` with
`init: inherit` starts its members. State is checkpointed under DIR/state; `--resume`
continues an interrupted search to the same result and log (a differentiable search adds a
`resume` record): what a re-run derives again, such as a finished search's selection and pool,
is logged once. The log's `runtime` records hold the device and CPU thread count: a search
resumed with others is told that it may not reproduce (they change the order of the arithmetic,
and with it the supernets' weights and the scores). With `logging.tensorboard=true` DIR also
receives TensorBoard event files: per epoch of a differentiable search its losses, temperature
and tracked score, and softmax(α) of every slot (`search/alpha/SLOT/OP`; a sequential search's
k-th search under `search{k}/`).

With `conditioning=film` the search is for networks conditioned on the planning preferences
(docs/how-to/preferences.md; the data set's preference plans, `data synth --preferences K`):
every network, supernets included, is conditioned as `nasdose train` conditions it with
`model.conditioning: film`, learns from one preference plan of each patient per draw, asked for its
preferences, and is scored on every plan of each patient (`strategies/task.py`); pool.yaml records
the conditioning, and `nasdose ensemble` trains conditioned members from it.

With `cascade.coarse=RUN` the search is for the full-resolution stage of a cascade refining RUN
(`strategies/task.py`): source-grid patches, networks in a Refiner, scores a patch proxy; the
pool records the cascade, and `nasdose ensemble` trains its members as stages of it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nas_dose import distributed
from nas_dose.cascade.patches import CascadeConfig
from nas_dose.config import ConfigError, at_least, from_dict, save_config, to_dict
from nas_dose.data.dataset import IN_CHANNELS, input_channels
from nas_dose.data.store import open_data
from nas_dose.errors import NasDoseError, input_error
from nas_dose.io import load_checkpoint, load_yaml, output_folder, save_checkpoint
from nas_dose.models.conditioning import KINDS
from nas_dose.models.refiner import REFINER_CHANNELS
from nas_dose.pool import Candidate, DiversityConfig, Pool, PoolMember, pairwise_matrices, save_pool, select_pool
from nas_dose.pool.pareto import (
    LABELS,
    Cost,
    cost_of,
    diversity_to_best,
    front_record,
    pareto_front,
    within_budget,
)
from nas_dose.pool.plots import plot_arch_weights, plot_diversity, plot_fitness, plot_pareto
from nas_dose.progress import say
from nas_dose.runtime import Runtime, RuntimeConfig, seed_everything
from nas_dose.search_spaces import get_space, import_plugins, save_genotype
from nas_dose.training.events import EventLog, LoggingConfig

from .base import SearchContext, Strategy, get_strategy, read_log
from .evaluator import SUPERNET_FILE, EvaluatorConfig, derived_seed
from .evolution import hinge_terms, prediction_masks
from .task import CascadeTask, PlanTask, SearchTask


@dataclass
class SplitConfig:
    """Which patients the search uses.

    Architecture patients are `arch_fraction` of `search_split` (drawn with the seed; the rest
    train the weights) or, if `arch_split` is set, that whole split. Diversity is measured on
    `diversity_split` (at most `max_diversity_patients` of it, in file order).
    """

    search_split: str = "train"
    arch_fraction: float = 0.3
    arch_split: str | None = None
    diversity_split: str = "validation"
    max_diversity_patients: int | None = None

    def validate(self) -> None:
        if not 0 < self.arch_fraction < 1:
            raise ConfigError(f"config key 'data.arch_fraction': must be in (0, 1), got {self.arch_fraction}")
        if self.max_diversity_patients is not None and self.max_diversity_patients < 1:
            raise ConfigError("config key 'data.max_diversity_patients': must be at least 1")


@dataclass
class SearchConfig:
    """Everything a search depends on; saved (resolved) as DIR/config.yaml."""

    space: str = "lenas"
    plugins: list[str] = field(default_factory=list)  # modules that register ops or spaces
    macro: dict[str, Any] = field(default_factory=dict)  # overrides of the space's default macro
    strategy: str = "differentiable"
    options: dict[str, Any] = field(default_factory=dict)  # the strategy's Config
    pool_size: int = 4
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
    data: SplitConfig = field(default_factory=SplitConfig)
    seed: int = 0
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    time_budget_min: float | None = None  # whole command; a search stops at its next checkpoint
    # The candidates' cost (pool.yaml records the accuracy-cost front, plots/pareto.png draws it)
    # and, with pool_max_cost, a budget: the pool is the most accurate (and diverse) within it.
    # params, flops (a forward pass at the data set's grid) or latency: that pass measured on the
    # runtime's device (ms, batch 1, median of a few after a warm-up; its metric latency_ms).
    cost: Cost = "flops"
    pool_max_cost: float | None = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # With `coarse`, the search is for a cascade's full-resolution stage (train's `cascade` keys):
    # networks take the coarse dose as one more channel, learn on source-grid patches, and are
    # scored on fixed ones; pool.yaml records it, so that `nasdose ensemble` trains stages.
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    # `film`: search networks conditioned on the planning preferences (train's model.conditioning):
    # a conditioned supernet learns from the preference plans, candidates are scored on every
    # plan, each asked for its preferences (strategies/task.py); pool.yaml records it, so that
    # `nasdose ensemble` trains conditioned members.
    conditioning: str | None = None

    def validate(self) -> None:
        at_least("pool_size", self.pool_size, 1)
        if self.conditioning is not None:
            if self.conditioning not in KINDS:
                raise ConfigError(f"config key 'conditioning': expected one of {', '.join(KINDS)} (or none), "
                                  f"got {self.conditioning!r}")
            if self.cascade.coarse is not None:
                raise ConfigError("config key 'conditioning': a cascade's full-resolution stage cannot be "
                                  "conditioned (condition its coarse stage)")
        if self.cascade.coarse is not None and self.macro.get("in_channels", REFINER_CHANNELS) != REFINER_CHANNELS:
            raise ConfigError(f"config key 'macro.in_channels': a cascade's stage takes {REFINER_CHANNELS} "
                              "channels (leave it out)")
        if self.pool_max_cost is not None and not self.pool_max_cost > 0:
            raise ConfigError(f"config key 'pool_max_cost': must be positive, got {self.pool_max_cost}")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise ConfigError(f"config key 'time_budget_min': must be positive, got {self.time_budget_min}")


def macro_channels(data: Path, macro: dict[str, Any]) -> dict[str, int]:
    """The macro's `in_channels` for a data set with extra input channels (none for a standard
    one: genotypes of standard data stay as they were); one the data does not give is an error."""
    channels = input_channels(data)
    given = macro.get("in_channels", channels)
    if given != channels:
        raise ConfigError(f"config key 'macro.in_channels': {given}, but {data} gives {channels} input channels "
                          "(leave it out)")
    return {} if channels == IN_CHANNELS else {"in_channels": channels}


def split_patients(data: Path, cfg: SplitConfig, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(weight, architecture, diversity) patient ids; weight and architecture are disjoint."""
    with open_data(data) as f:
        pool = f.ids(cfg.search_split)
        if cfg.arch_split is not None:
            arch = f.ids(cfg.arch_split)
        else:
            n = min(max(1, round(cfg.arch_fraction * len(pool))), len(pool) - 1)
            drawn = set(np.random.default_rng([seed, 7]).choice(len(pool), size=max(n, 0), replace=False).tolist())
            arch = [pid for i, pid in enumerate(pool) if i in drawn]
        weight = [pid for pid in pool if pid not in set(arch)]
        diversity = f.ids(cfg.diversity_split)[:cfg.max_diversity_patients]
        # Read them all once now: the validation patients are otherwise first read at the end.
        f.verify([*pool, *arch, *diversity], values=True)
    if not weight or not arch:
        raise input_error(data, f"split '{cfg.search_split}' has {len(pool)} patient(s); a search needs "
                                "at least one for the weights and one for the architecture")
    if not diversity:  # the pool's accuracy and diversity would be NaN: nothing to choose on
        raise input_error(data, f"no '{cfg.diversity_split}' patients: a search chooses its pool on them "
                                "(set data.diversity_split to a split that has some)")
    return weight, arch, diversity


# How the fitness plot names the scored records of the search log.
EVENT_LABELS = {"epoch": "strongest ops after an epoch", "candidate": "final candidate"}


class SearchRun:
    """One `nasdose search`: the strategy runs, the pool selection and the outputs."""

    def __init__(self, cfg: SearchConfig, data: Path, out: Path) -> None:
        self.cfg = cfg
        self.data = Path(data)
        self.out = Path(out)
        import_plugins(cfg.plugins)
        self.space = get_space(cfg.space, source="config key 'space'")
        stage = {"in_channels": REFINER_CHANNELS} if cfg.cascade.coarse is not None else macro_channels(data, cfg.macro)
        self.macro = self.space.check_macro({**cfg.macro, **stage}, "config key 'macro'")
        self.strategy_cls = get_strategy(cfg.strategy)
        if cfg.cascade.coarse is not None:
            self.strategy_cls.check_stage_search(cfg.diversity)
        if cfg.conditioning is not None:
            self.strategy_cls.check_conditioned(cfg.diversity)
        self.options: Any = from_dict(self.strategy_cls.Config, cfg.options, prefix="options")
        evaluator = getattr(self.options, "evaluator", None)
        if isinstance(evaluator, EvaluatorConfig) and evaluator.supernet is not None:
            # as every path a config gives, relative to the working directory; recorded absolute,
            # so that `--resume` and `nasdose ensemble … init=inherit` find it from anywhere
            evaluator.supernet = str(Path(evaluator.supernet).resolve())
        cfg.options = to_dict(self.options)  # the resolved options go into config.yaml
        self.strategy_cls.check_diversity(self.options, cfg.diversity)
        self.runtime = Runtime(cfg.runtime)
        self.weight_ids, self.arch_ids, self.diversity_ids = split_patients(self.data, cfg.data, cfg.seed)
        used = [*self.weight_ids, *self.arch_ids, *self.diversity_ids]
        self.task = (CascadeTask(self.data, cfg.cascade, cfg.data.search_split, [*self.arch_ids, *self.diversity_ids],
                                 self.runtime, cfg.seed) if cfg.cascade.coarse is not None
                     else SearchTask(self.data) if cfg.conditioning is None
                     else PlanTask(self.data, cfg.conditioning, used))
        grid = self.task.grid
        self.space, self.removed = self.space.fitted(self.macro, grid)
        if self.removed:
            where = f"{grid}³ patches" if self.task.cascade else f"the {grid}³ grid"
            say(f"search space '{self.space.name}' on {where}: left out "
                + "; ".join(f"{s} {', '.join(map(str, v))}" for s, v in self.removed.items())
                + " (no network with them takes the input)")
        budget = cfg.time_budget_min
        self.deadline = None if budget is None else time.monotonic() + 60.0 * budget
        self.histories: list[list[dict[str, list[float]]]] = []  # α per epoch of each search, if any
        # the candidates of a single search (its accuracy-cost front); a sequential one's are its
        # members, the only candidates a resumed sequence still holds
        self.scored: list[Candidate] = []
        self.events = EventLog()  # opened when the search runs (not in a folder it is refused)
        self.base = self.context("search", [], {})  # for data access and the command's own log records

    def context(self, state: str, references: list[dict[str, np.ndarray]], fields: dict[str, Any],
                seed: int | None = None) -> SearchContext:
        """The context of one search (`seed`: its own, default the run's); every search of the run
        shares the evaluator's folder and supernet file (DIR/state, DIR/supernet.pt)."""
        return SearchContext(self.space, self.macro, self.data, self.runtime,
                             self.cfg.seed if seed is None else seed, self.weight_ids,
                             self.arch_ids, self.diversity_ids, references, self.cfg.diversity,
                             state_dir=self.out / "state" / state, log_path=self.out / "search_log.jsonl",
                             log_fields=fields, deadline=self.deadline, events=self.events.within(state),
                             task=self.task, shared_dir=self.out / "state", supernet_file=self.out / SUPERNET_FILE,
                             run_seed=self.cfg.seed, measure_latency=self.cfg.cost == "latency")

    def _search(self, ctx: SearchContext) -> tuple[list[Candidate], list[dict[str, list[float]]], Strategy]:
        """The strategy's candidates, its α history (a differentiable one's) and the strategy."""
        seed_everything(ctx.seed)
        strategy: Strategy = self.strategy_cls(self.options)
        cands = strategy.run(ctx)
        history = getattr(strategy, "history", [])
        if history:
            self.histories.append(history)
        return cands, history, strategy

    def sequential(self) -> list[Candidate]:
        """K searches in a row, the k-th with its own seed and the hinge against members 0..k-1
        (see the module docstring)."""
        members: list[Candidate] = []
        for k in range(self.cfg.pool_size):
            path = self.out / "state" / f"member{k}.pt"
            if distributed.on_main(path.exists):  # every rank takes the same branch
                state = load_checkpoint(path)
                members.append(Candidate.from_state(state["member"], str(path)))
                if state["history"]:
                    self.histories.append(state["history"])
                continue
            seed = search_seed(self.cfg.seed, k)
            ctx = self.context(f"search{k}", [m.predictions or {} for m in members], {"search": k}, seed)
            if k and ctx.should_stop():
                ctx.log({"event": "time_budget", "members": k})
                say(f"time budget spent: {k} of {self.cfg.pool_size} members found")
                break
            ctx.log({"event": "sequential_search", "seed": seed, "references": k})
            cands, history, strategy = self._search(ctx)
            cands = within_budget(cands, self.cfg.cost, self.cfg.pool_max_cost)
            found = {m.genotype.key() for m in members}
            distinct = [c for c in cands if c.genotype.key() not in found]
            if not distinct:
                ctx.log({"event": "no_new_genotype", "candidates": len(cands)})
                say(f"search {k} found no genotype new to the pool; stopping at {k} members")
                break
            if distinct[0] is not cands[0]:
                ctx.log({"event": "fallback", "reason": "best candidate already in the pool",
                         "duplicate": cands[0].genotype.to_dict(), "best_distinct": distinct[0].genotype.to_dict()})
                say(f"search {k}: its best genotype is already a member; the member is chosen among the others")
            chosen, active = self._choose(ctx, strategy, distinct)
            chosen.metrics = {**chosen.metrics, "search": float(k), "fallback": float(distinct[0] is not cands[0]),
                              **({} if active is None else {"hinge_active": float(active)})}
            members.append(chosen)
            save_checkpoint(path, {"member": chosen.to_state(), "history": history})
        return members

    def _choose(self, ctx: SearchContext, strategy: Strategy, distinct: list[Candidate]
                ) -> tuple[Candidate, bool | None]:
        """The member among `distinct` (new to the pool, the strategy's order) and whether the
        hinge was active (None: no references yet); logs a `hinge` record (module docstring)."""
        if not ctx.references:
            return distinct[0], None
        div = ctx.diversity
        masks = prediction_masks(ctx)
        terms = [float(np.mean(hinge_terms(c, ctx.references, div.margin, masks))) for c in distinct]
        acted = strategy.hinge_acted()
        if acted is None:
            objective = [c.score + div.weight * t if math.isfinite(c.score) else math.inf
                         for c, t in zip(distinct, terms)]
            best = min(range(len(distinct)), key=lambda i: (objective[i], distinct[i].score, i))
            chosen, active = distinct[best], best != 0
        else:
            chosen, active = distinct[0], acted
        ctx.log({"event": "hinge", "active": active, "candidates": len(distinct),
                 "zero_terms": sum(t == 0 for t in terms), "terms": terms, "member": chosen.genotype.to_dict(),
                 "most_accurate": distinct[0].genotype.to_dict()})
        if not active:
            k = len(ctx.references)
            say(f"search {k}: the diversity hinge was inactive (" + (
                "its hinge was zero at every architecture step" if acted is not None
                else "every candidate already differs from the members by the margin" if not any(terms)
                else "it changed no choice: the member is the most accurate new candidate") + ")")
        return chosen, active

    def single(self) -> list[Candidate]:
        """One search; K of its candidates by accuracy + lam × diversity (lam = 0 in mode none)."""
        cands, _, _ = self._search(self.base)
        self.scored.extend(cands)
        affordable = within_budget(cands, self.cfg.cost, self.cfg.pool_max_cost)
        if not affordable:
            raise NasDoseError(f"{self.out}: no candidate within pool_max_cost={self.cfg.pool_max_cost:g} "
                               f"{self.cfg.cost}")
        cands = affordable
        lam = self.cfg.diversity.lam if self.cfg.diversity.mode == "pool" else 0.0
        matrices = pairwise_matrices(cands, *self.targets())
        chosen = select_pool(cands, self.cfg.pool_size, lam, matrices)
        self.base.log({"event": "selection", "lam": lam, "candidates": len(cands), "chosen": chosen,
                       "scores": [cands[i].score for i in chosen]})
        if len(chosen) < self.cfg.pool_size:
            say(f"only {len(chosen)} distinct usable candidates for a pool of {self.cfg.pool_size}")
        return [cands[i] for i in chosen]

    def targets(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Reference doses (dose / 70) and possible-dose masks of the diversity patients."""
        return self.base.targets(self.diversity_ids)

    def run(self) -> Pool:
        self.events = EventLog.open(self.out, self.cfg.logging)
        self.base.events = self.events.within("search")
        try:
            return self._run()
        finally:
            self.events.close()

    def _run(self) -> Pool:
        self._record_runtime()
        if self.removed:
            self.base.log({"event": "space_fitted", "removed": self.removed})
        if self.task.cascade is not None:
            self.base.log({"event": "cascade_stage", "coarse": self.task.cascade["coarse"],
                           "scored_on": self.task.scored_on})
        members = self.sequential() if self.cfg.diversity.mode == "sequential" else self.single()
        if not members:
            raise NasDoseError(f"{self.out}: the search produced no usable candidate")
        names = [f"m{i}" for i in range(len(members))]
        seen = self.scored or members
        targets, masks = self.targets()
        matrices = pairwise_matrices(members, targets, masks)
        diversity = diversity_to_best(seen, masks)
        source = self.strategy_cls.predictions_from
        pool = Pool(self.space.name, self.cfg.strategy, self.cfg.seed,
                    [PoolMember(n, m.genotype, m.score, m.metrics) for n, m in zip(names, members)], matrices,
                    f"{source}; validation patients: {', '.join(self.diversity_ids) or 'none'}"
                    + ("" if self.task.cascade is None and self.task.conditioning is None
                       else f"; {self.task.scored_on}"),
                    to_dict(self.cfg), front_record(seen, self.cfg.cost, diversity), self.task.cascade,
                    self.cfg.conditioning)
        for name, m in zip(names, members):
            save_genotype(self.out / "genotypes" / f"{name}.yaml", m.genotype)
        save_pool(self.out / "pool.yaml", pool)
        if distributed.writes_here():  # the plots read the log, which only the main rank writes
            self.plots(pool, seen, diversity)
        self.base.log({"event": "pool", "members": names, "scores": [m.score for m in members]})
        return pool

    def _record_runtime(self) -> None:
        """Log the device and CPU thread count this run computes with, and say when a resumed
        search uses others than its start: they change the order of the arithmetic, so the
        supernets and scores computed from here on can differ from an uninterrupted run's."""
        now = {k: v for k, v in self.runtime.describe().items() if k in ("device", "threads")}
        earlier = [{k: r.get(k) for k in now} for r in read_log(self.out / "search_log.jsonl")
                   if r.get("event") == "runtime"]
        if any(r != now for r in earlier):
            say(f"resumed on {now['device']} with {now['threads']} thread(s); the search began on "
                f"{earlier[0]['device']} with {earlier[0]['threads']}: scores from here on may differ "
                "from an uninterrupted run's")
        self.base.log({"event": "runtime", **now})

    def plots(self, pool: Pool, seen: list[Candidate], diversity: list[float] | None) -> None:
        """Architecture weights, fitness, diversity, and `seen` (the scored candidates) against cost,
        with their front of accuracy, cost and `diversity` where known."""
        folder = self.out / "plots"
        if self.histories:
            titles = [f"search {k}" for k in range(len(self.histories))] if len(self.histories) > 1 else None
            plot_arch_weights(self.histories, self.space.slots(), folder / "arch_weights.png", titles)
        records = read_log(self.out / "search_log.jsonl")
        scored = [r for r in records if "genotype" in r and isinstance(r.get("score"), (int, float))]
        sequential = self.cfg.diversity.mode == "sequential"
        labels = [(f"search {r.get('search', 0)}: " if sequential else "") + EVENT_LABELS.get(r["event"], r["event"])
                  for r in scored]
        plot_fitness([r["score"] for r in scored], labels, folder / "fitness.png")
        plot_diversity(pool.names, pool.matrices, folder / "diversity.png")
        keys = [c.genotype.key() for c in seen]
        chosen = [keys.index(m.genotype.key()) for m in pool.members if m.genotype.key() in keys]
        plot_pareto([c.score for c in seen], [cost_of(c, self.cfg.cost) for c in seen],
                    pareto_front(seen, self.cfg.cost), chosen, LABELS[self.cfg.cost], folder / "pareto.png",
                    [] if diversity is None else pareto_front(seen, self.cfg.cost, diversity))


def search_seed(seed: int, k: int) -> int:
    """The seed of search k of a sequential run: `seed` for the first, one derived from (seed, k)
    for the others."""
    return seed if k == 0 else derived_seed(seed, "sequential", k)


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))]
    return [] if a == b else [prefix or "(root)"]


def prepare_out(out: Path, cfg: SearchConfig, resume: bool) -> None:
    """A new search needs a fresh folder; a resumed one the same config (runtime and logging may differ)."""
    saved = out / "config.yaml"
    if saved.exists():
        if not resume:
            raise input_error(out, "already holds a search; use --resume to continue it, --force to replace it, "
                                  "or another --out")
        old = {k: v for k, v in (load_yaml(saved) or {}).items() if k not in ("runtime", "logging")}
        new = {k: v for k, v in to_dict(cfg).items() if k not in ("runtime", "logging")}
        changed = _differences(old, new)
        if changed:
            raise input_error(saved, f"the search was made with a different config ({', '.join(changed)}); "
                                     "resume with its own config or choose another --out")
    elif resume:
        raise input_error(out, "no search to resume (no config.yaml)")
    save_config(saved, cfg)


Config = SearchConfig


@dataclass(frozen=True)
class Inputs:
    data: Path  # a nasdose data set


def run(config: SearchConfig, inputs: Inputs, out: Path, resume: bool = False, *, force: bool = False) -> Pool:
    """Search and choose the pool into `out` (pool.yaml, genotypes, log, plots); `resume`
    continues a search there (its config must be the same, runtime aside), `force` removes an
    earlier one first."""
    out = Path(out)
    with output_folder(out, replace=force):
        search = SearchRun(config, inputs.data, out)
        distributed.on_main(prepare_out, out, config, resume)  # checks, then writes: one rank
        started = time.monotonic()
        pool = search.run()
    stage = "" if search.task.cascade is None else f"full-resolution stages refining {config.cascade.coarse}: "
    say(f"pool of {len(pool.members)} {stage}in {out / 'pool.yaml'} ({time.monotonic() - started:.0f} s), "
        f"search-time validation dose scores on {search.task.scored_on} (proxies for ranking, not official "
        "scores): " + ", ".join(
        f"{m.name} {m.search_score:.3f} Gy" for m in pool.members))
    return pool

