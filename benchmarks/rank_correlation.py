"""Does the search's cheap score rank architectures the way full training ranks them?

    python benchmarks/rank_correlation.py [--quick] [--modes inherit train finetune] [--archs 12]
        [--seeds 0 1] [--supernet-steps N] [--train-steps N] [--finetune-steps N] [--full-epochs N]
        [--full-steps N] [--full-seeds N] [--sampling uniform|fair] [--data DATA.h5]
        [--trained EARLIER.json] [--out FILE.json]

Every search strategy that scores genotypes one by one trusts a proxy: the "inherit" evaluator
(the genotype's path through an SPOS supernet trained once), the "train" evaluator (a short
training from scratch) or the "finetune" evaluator (a short training from the inherited
weights). This measures whether the proxy ranks, instead of assuming it.

Per seed, on a fresh synthetic data set (`nas_dose.data.synth`, made in a temporary folder) or,
with --data, a data set `nasdose data import` made (e.g. the OpenKBP patients at 32³):

1. cheap scores: `nasdose search`'s own objects score `--archs` genotypes, for each evaluator
   mode: a `SearchRun` (random strategy, budget = archs, diversity off) builds the search
   context (the seed's weight/architecture split of the training patients) and the strategy
   draws and scores the genotypes with its `CandidateEvaluator`, exactly as a search does. The
   random strategy's draws do not depend on scores, so every mode scores the same genotypes;
2. trained scores: each genotype is trained from scratch by `nas_dose.training.train_model`
   with one fixed budget and seed for all (`--full-epochs` × `--full-steps`, batch 1, no
   augmentation) on the whole training split and scored on the validation split (best
   validation dose score, Gy, as `nasdose train` chooses its model; on a resampled data set
   that checkpoint's official score on the source grid); with `--full-seeds N` N times, with
   training seeds `full_seed`, `full_seed` + 1, ..., and the trained score is their mean;
3. Kendall τ and Spearman ρ (scipy.stats) between the two, and the top-k hits: how many of the
   k best trained genotypes are among the k best by the cheap score. With N ≥ 2 full seeds the
   row "yardstick" compares the trainings of different seeds with each other (the mean over
   pairs of seeds): how well the yardstick ranks itself, the ceiling of what a proxy can show.

Seeds change the drawn genotypes, the patient split and the supernet; the table gives the mean
± sample sd over seeds. The full trainings are most of the cost: `--trained EARLIER.json` (an
earlier run's output, on the same data with the same full-training settings) takes their scores
from it, so that another proxy (e.g. `--sampling fair`, more `--supernet-steps`) is measured
against the same yardstick in minutes; a genotype it did not train is trained. Lower scores are
better in both, so τ > 0 means the proxy agrees. Not in the suite (the full size takes half an
hour on a CPU); `run(quick)` is its entry point.
"""
from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from scipy import stats

from nas_dose.data import synth
from nas_dose.errors import NasDoseError
from nas_dose.pool import Candidate, DiversityConfig
from nas_dose.progress import set_quiet
from nas_dose.runtime import RuntimeConfig, resolve_device, seed_everything
from nas_dose.search_spaces import genotype_from_dict, get_space
from nas_dose.strategies.search import SearchConfig, SearchRun

from common import Row, add_settings_arguments, mean_sd, result, settings_option, trained_score
from common import main as bench_main

MODES = ("inherit", "train", "finetune")
YARDSTICK = "yardstick"  # the row of one full training seed against another


@dataclass
class Settings:
    """What one measurement runs; the defaults fit about half an hour on one CPU thread at 16³."""

    patients: int = 24
    grid: int = 16
    data_seed: int = 0
    space: str = "lenas"
    stem: int = 4
    widths: list[int] = field(default_factory=lambda: [8, 16])
    archs: int = 12
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    supernet_steps: int = 1000  # "inherit", "finetune": SPOS supernet steps (per seed and mode); the default
    train_steps: int = 200  # "train": steps of each genotype's short training; EvaluatorConfig's default
    finetune_steps: int = 50  # "finetune": steps from the inherited weights; EvaluatorConfig's default
    lr: float = 1e-3  # the evaluator's and the full training's
    full_epochs: int = 6
    full_steps: int = 100  # per epoch: 600 steps of full training per genotype by default
    full_seed: int = 1000  # the same initialization and batch order for every genotype
    full_seeds: int = 1  # full trainings per genotype (seeds full_seed, full_seed + 1, ...)
    top_k: int = 3
    threads: int | None = 1  # small volumes run fastest on one thread
    data: str = ""  # an imported data set (.h5) instead of the synthetic one; its grid wins over `grid`
    sampling: str = "uniform"  # the supernet's paths: EvaluatorConfig.sampling
    trained: str = ""  # an earlier run's output (.json) whose full trainings are reused

    def quick(self) -> Settings:
        """Seconds: 8 patients, a tiny network, 4 genotypes, one seed, a few steps of each kind."""
        return replace(self, patients=8, stem=2, widths=[4, 8], archs=4, seeds=[0], supernet_steps=8,
                       train_steps=4, finetune_steps=2, full_epochs=1, full_steps=6)

    def validate(self) -> None:
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown:
            raise ValueError(f"unknown evaluator modes {unknown} (known: {', '.join(MODES)})")
        if self.full_seeds < 1:
            raise ValueError(f"need at least 1 full training seed (got {self.full_seeds})")
        if self.archs < 3 or not 1 <= self.top_k <= self.archs:
            raise ValueError(f"need at least 3 genotypes and 1 <= top-k <= archs (got {self.archs}, {self.top_k})")


def cheap_scores(s: Settings, mode: str, seed: int, data: Path, folder: Path, device: str) -> dict[Any, Candidate]:
    """Genotype key -> candidate for the `s.archs` genotypes a random search of seed `seed` draws,
    scored by its evaluator in `mode`: the search's own SearchRun, context, strategy and evaluator."""
    evaluator = {"mode": mode, "supernet_steps": s.supernet_steps, "train_steps": s.train_steps,
                 "finetune_steps": s.finetune_steps, "batch_size": 1, "lr": s.lr, "sampling": s.sampling}
    cfg = SearchConfig(space=s.space, macro={"stem": s.stem, "widths": list(s.widths)}, strategy="random",
                       options={"budget": s.archs, "evaluator": evaluator}, pool_size=1,
                       diversity=DiversityConfig(mode="none"), seed=seed,
                       runtime=RuntimeConfig(device=device, threads=s.threads))
    search = SearchRun(cfg, data, folder)
    seed_everything(seed)
    strategy = search.strategy_cls(search.options)
    return {c.genotype.key(): c for c in strategy.run(search.base)}


def rank_stats(cheap: Sequence[float], trained: Sequence[float], k: int) -> dict[str, float]:
    """Kendall τ (τ-b), Spearman ρ and top-k hits of two score lists (lower is better in both)."""
    def best(scores: Sequence[float]) -> set[int]:
        return set(sorted(range(len(scores)), key=lambda i: scores[i])[:k])

    return {"kendall_tau": float(stats.kendalltau(cheap, trained).statistic),
            "spearman_rho": float(stats.spearmanr(cheap, trained).statistic),
            "top_k_hits": float(len(best(cheap) & best(trained)))}


# what the trained scores depend on: an earlier run's are reused only where all of these agree
YARDSTICK_SETTINGS = ("patients", "grid", "data_seed", "space", "stem", "widths", "lr", "full_epochs", "full_steps",
                      "data")


def earlier_trainings(s: Settings) -> dict[tuple[Any, int], tuple[float, float]]:
    """(genotype key, full seed) -> (trained score, 0 s) of the run `s.trained` wrote; one line
    naming the file if it was measured on other data or with another full training."""
    path = Path(s.trained)
    try:
        measured = json.loads(path.read_text())["benchmarks"]["rank_correlation"]["measurements"]
        settings, runs = measured["settings"], measured["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NasDoseError(f"{path}: not the output of rank_correlation.py ({e})") from None
    changed = [k for k in YARDSTICK_SETTINGS if settings.get(k) != asdict(s)[k]]
    if changed:
        raise NasDoseError(f"{path}: its full trainings were made with other settings ({', '.join(changed)})")
    return {(genotype_from_dict(g, str(path)).key(), settings["full_seed"] + i): (score, 0.0)
            for r in runs for i, scores in enumerate(r["trained_scores_per_seed"])
            for g, score in zip(r["genotypes"], scores)}


def measure(s: Settings, workdir: Path, device: str) -> list[dict[str, Any]]:
    """One record per (seed, mode), and per seed one of the yardstick against itself with 2 or
    more full seeds, printed as it ends; genotypes drawn twice are trained once per full seed."""
    s.validate()
    set_quiet(True)
    if s.data:
        data = Path(s.data)
    else:
        data = workdir / f"synth_{s.patients}_g{s.grid}.h5"
        synth.run(synth.Config(patients=s.patients, grid=s.grid, seed=s.data_seed), synth.Inputs(), data)
    # (genotype key, full seed) -> (score, seconds)
    trained: dict[tuple[Any, int], tuple[float, float]] = earlier_trainings(s) if s.trained else {}
    full_seeds = [s.full_seed + i for i in range(s.full_seeds)]
    runs = []
    for seed in s.seeds:
        cheap: dict[str, tuple[dict[Any, Candidate], float]] = {}
        for mode in s.modes:
            started = time.perf_counter()
            cands = cheap_scores(s, mode, seed, data, workdir / f"seed{seed}-{mode}", device)
            cheap[mode] = cands, time.perf_counter() - started
        genotypes = [c.genotype for c in cheap[s.modes[0]][0].values()]
        if any(set(cands) != {g.key() for g in genotypes} for cands, _ in cheap.values()):
            raise RuntimeError(f"seed {seed}: the evaluator modes scored different genotypes")
        for full_seed in full_seeds:
            for g in genotypes:
                if (g.key(), full_seed) not in trained:
                    started = time.perf_counter()
                    score = trained_score(partial(get_space(g.space).build, g), data, s.full_epochs, s.full_steps,
                                          full_seed, s.lr, device, s.threads)
                    trained[g.key(), full_seed] = score, time.perf_counter() - started
        per_seed = [[trained[g.key(), f][0] for g in genotypes] for f in full_seeds]
        full = [statistics.fmean(scores) for scores in zip(*per_seed)]
        common = {"full_seconds": round(sum(trained[g.key(), f][1] for g in genotypes for f in full_seeds), 2),
                  "trained_scores": full, "trained_scores_per_seed": per_seed,
                  "genotypes": [g.to_dict() for g in genotypes]}
        records = [(mode, rank_stats([cands[g.key()].score for g in genotypes], full, s.top_k),
                    {"cheap_seconds": round(seconds, 2), "cheap_scores": [cands[g.key()].score for g in genotypes]})
                   for mode, (cands, seconds) in cheap.items()]
        if len(full_seeds) > 1:
            pairs = [rank_stats(a, b, s.top_k) for a, b in itertools.combinations(per_seed, 2)]
            records.append((YARDSTICK, {k: statistics.fmean(p[k] for p in pairs) for k in pairs[0]},
                            {"cheap_seconds": 0.0}))
        for mode, ranks, extra in records:
            runs.append({"seed": seed, "mode": mode, **ranks, **extra, **common})
            print(f"  seed {seed} {mode:<9} τ {ranks['kendall_tau']:+.3f}  ρ {ranks['spearman_rho']:+.3f}  "
                  f"top-{s.top_k} hits {ranks['top_k_hits']:.1f}  cheap {extra['cheap_seconds']:.0f} s", flush=True)
    return runs


def rows_of(s: Settings) -> list[str]:
    """The table's rows: the evaluator modes, then the yardstick against itself (2+ full seeds)."""
    return [*s.modes, *([YARDSTICK] if s.full_seeds > 1 else [])]


def summarize(s: Settings, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds of τ, ρ and the top-k hits, per evaluator mode (and the yardstick)."""
    out = []
    for mode in rows_of(s):
        mine = [r for r in runs if r["mode"] == mode]
        out.append({"mode": mode, "archs": s.archs, "seeds": [r["seed"] for r in mine],
                    **{key: mean_sd([r[key] for r in mine]) for key in ("kendall_tau", "spearman_rho", "top_k_hits")},
                    "cheap_seconds": statistics.fmean(r["cheap_seconds"] for r in mine)})
    return out


def budget(s: Settings) -> str:
    patients = f"the patients of {s.data}" if s.data else f"{s.grid}³, {s.patients} synthetic patients"
    return (f"{s.archs} genotypes of {s.space} (stem {s.stem}, widths {s.widths}), "
            f"{patients}; inherit: {s.supernet_steps} supernet steps; train: {s.train_steps} steps; "
            f"finetune: {s.finetune_steps} steps; sampling: {s.sampling}; full: {s.full_epochs}×{s.full_steps} steps, "
            f"seed{'s' if s.full_seeds > 1 else ''} {', '.join(str(s.full_seed + i) for i in range(s.full_seeds))}"
            f"{' (the mean)' if s.full_seeds > 1 else ''}")


def run(quick: bool, device: str = "auto", settings: Settings | None = None) -> dict[str, Any]:
    """Benchmark entry point: the measurement at `quick` size (or `settings`) in a temporary folder."""
    dev = resolve_device(device)
    s = settings or (Settings().quick() if quick else Settings())
    print(f"rank correlation: {budget(s)}; seeds {s.seeds}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = measure(s, Path(tmp), str(dev))
    summary = summarize(s, runs)
    rows = []
    for r in summary:
        where = f"{r['mode']}, {r['archs']} archs, {len(r['seeds'])} seeds"
        pair = "trained vs trained (other seed)" if r["mode"] == YARDSTICK else "cheap vs trained"
        cost = "" if r["mode"] == YARDSTICK else f"; cheap scoring {r['cheap_seconds']:.0f} s per seed"
        rows += [Row(f"Kendall τ {pair} ({where})", r["kendall_tau"][0],
                     detail="mean ± sd {:+.3f} ± {:.3f}".format(*r["kendall_tau"])),
                 Row(f"Spearman ρ {pair} ({where})", r["spearman_rho"][0],
                     detail="mean ± sd {:+.3f} ± {:.3f}".format(*r["spearman_rho"])),
                 Row(f"top-{s.top_k} hits ({where})", r["top_k_hits"][0],
                     detail=f"mean ± sd {r['top_k_hits'][0]:.2f} ± {r['top_k_hits'][1]:.2f} of {s.top_k}{cost}")]
    wall = time.perf_counter() - started
    return result("rank_correlation", dev, rows,
                  measurements={"settings": asdict(s), "summary": summary, "runs": runs, "wall_seconds": wall},
                  notes=[f"budget: {budget(s)}",
                         "τ, ρ > 0: the cheap score ranks as full training does (1: the same order); "
                         f"top-{s.top_k} hits by chance: {s.top_k ** 2 / s.archs:.2f} on average",
                         f"wall time {wall / 60:.1f} min"])


if __name__ == "__main__":
    bench_main("rank_correlation", run, __doc__.splitlines()[0],
               add=partial(add_settings_arguments, defaults=Settings()),
               options=partial(settings_option, defaults=Settings()))
