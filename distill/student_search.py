"""A student sized for a budget: `--student search:max_flops=3e9` asks nasdose's cost-aware search
for the most accurate genotype within the limits instead of a hand-picked architecture.

The search (`nasdose search`'s stage, its keys in the distillation's `student_search` section over
DEFAULTS) runs on the distillation's data set, training split for weights and architectures, into
DIR/student_search/. Its pool is one network, the most accurate within the first limit (its cost
and `pool_max_cost`); a strategy with an evaluator (evolution, random, optuna, nni) also rejects a
genotype over any limit before training it. The choice is recorded as student.yaml (the genotype)
and metrics.json there, and the distillation trains it as any genotype SPEC. A conditioned
teacher's student is searched conditioned (`nasdose search … conditioning=film`). A finished search
is reused (--resume); an interrupted one continues.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from nas_dose import distributed
from nas_dose.config import ConfigError, deep_merge, from_dict, to_dict
from nas_dose.errors import NasDoseError
from nas_dose.io import load_json, save_json
from nas_dose.models.spec import StudentSearch
from nas_dose.pool.pareto import METRICS
from nas_dose.runtime import RuntimeConfig
from nas_dose.search_spaces import save_genotype
from nas_dose.strategies import search as search_stage
from nas_dose.strategies.base import get_strategy
from nas_dose.strategies.evaluator import ScoringStrategy

# lenas_levels, whose width (50-100 % of the macro) and depth (2-4 levels) slots size the network
# (at 100 % and depth 3 the macro is the pipeline's hand-picked student, unet3d widths 8,16,32);
# evolution, because its evaluator rejects a genotype over a limit before training it (the
# differentiable strategy can only filter its final candidates); a budget of minutes on a CPU.
DEFAULTS: dict[str, Any] = {"space": "lenas_levels", "macro": {"stem": 8, "widths": [8, 16, 32, 64]},
                            "strategy": "evolution", "options": {"budget": 12, "population": 6, "sample": 3,
                                                                 "evaluator": {"supernet_steps": 200}}}
FOLDER = "student_search"
COSTS = {"max_params": "params", "max_flops": "flops", "max_latency_ms": "latency"}


def search_config(request: StudentSearch, section: dict[str, Any], seed: int, runtime: RuntimeConfig,
                  train_split: str, val_split: str, conditioning: str | None = None) -> search_stage.SearchConfig:
    """The search behind `request`: `section` over DEFAULTS (with a `strategy=` of the SPEC, those
    of their options that strategy has, such as `evaluator`; with a `strategy` of the section,
    those of DEFAULTS' options it has, under the section's own), the SPEC's budget, one member chosen
    on accuracy alone within the first limit, every limit as the evaluator's, the distillation's
    seed, runtime and splits. `conditioning` (a conditioned teacher's kind): the candidates are
    conditioned networks, scored on every plan at its own preferences, as the student will be."""
    data = deep_merge(DEFAULTS, section)
    if request.strategy is not None and request.strategy != data["strategy"]:
        known = _option_names(request.strategy)
        data = {**data, "strategy": request.strategy,
                "options": {k: v for k, v in data.get("options", {}).items() if k in known}}
    elif data["strategy"] != DEFAULTS["strategy"]:  # the section's own strategy: DEFAULTS' options it has
        known = _option_names(data["strategy"])
        data = {**data, "options": deep_merge({k: v for k, v in DEFAULTS["options"].items() if k in known},
                                              section.get("options", {}))}
    if request.budget is not None:
        if "budget" not in _option_names(data["strategy"]):
            raise ConfigError(f"--student search:...:budget={request.budget}: strategy '{data['strategy']}' has no "
                              "budget of genotypes; leave budget out (set its options in student_search)")
        data["options"] = {**data.get("options", {}), "budget": request.budget}
    first = next(iter(request.limits))
    data = {**data, "pool_size": 1, "diversity": {"mode": "none"}, "cost": COSTS[first],
            "pool_max_cost": request.limits[first], "seed": seed, "runtime": to_dict(runtime),
            "data": {**data.get("data", {}), "search_split": train_split, "diversity_split": val_split},
            **({} if conditioning is None else {"conditioning": conditioning})}
    cfg = from_dict(search_stage.SearchConfig, data, prefix="student_search")
    if issubclass(get_strategy(cfg.strategy), ScoringStrategy):
        limits = {k: int(v) if k == "max_params" else v for k, v in request.limits.items()}
        cfg.options = {**cfg.options, "evaluator": {**cfg.options.get("evaluator", {}), **limits}}
    elif len(request.limits) > 1:
        raise ConfigError(f"strategy '{cfg.strategy}' keeps one limit (its pool's cost budget), got "
                          f"{', '.join(request.limits)}; give one, or use evolution, random, optuna or nni")
    return cfg


def _option_names(strategy: str) -> set[str]:
    """The option keys of `strategy`'s Config."""
    return {f.name for f in dataclasses.fields(get_strategy(strategy).Config)}


def find_student(request: StudentSearch, section: dict[str, Any], seed: int, runtime: RuntimeConfig,
                 splits: tuple[str, str], data: Path, out: Path, resume: bool,
                 conditioning: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The chosen genotype's file and its record (searched now, or the finished search's);
    `conditioning` as in `search_config`."""
    folder = out / FOLDER
    genotype, record = folder / "student.yaml", folder / "metrics.json"
    if resume and distributed.on_main(record.is_file):
        return genotype, distributed.on_main(load_json, record)
    cfg = search_config(request, section, seed, runtime, *splits, conditioning)
    resumed = resume and distributed.on_main((folder / "config.yaml").is_file)
    pool = search_stage.run(cfg, search_stage.Inputs(data), folder, resumed)  # on every rank, as nasdose search
    chosen = pool.members[0]
    over = [k for k, limit in request.limits.items() if not chosen.metrics.get(METRICS[COSTS[k]], math.inf) <= limit]
    if over:  # the search's own checks keep this from happening; a wrong student is worse than none
        raise NasDoseError(f"{folder / 'pool.yaml'}: the chosen genotype exceeds {', '.join(over)}")
    chosen_record = {"limits": request.limits, "strategy": cfg.strategy, "conditioning": conditioning,
                     "search": str(folder), "genotype": chosen.genotype.to_dict(),
                     "search_score": chosen.search_score, "metrics": chosen.metrics}
    distributed.on_main(save_genotype, genotype, chosen.genotype)
    distributed.on_main(save_json, record, chosen_record)
    return genotype, chosen_record
