"""Preference plans: the slider vocabulary, synthetic plans whose dose follows their preferences,
and their storage."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from nas_dose import cli
from nas_dose.data import preferences
from nas_dose.data.openkbp import read_npz_patient
from nas_dose.data.patient import OARS, TARGETS
from nas_dose.data.preferences import SparingScale, spared_mean_doses
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import anatomy, synth_patient, synth_patients
from nas_dose.data.synth.beam import plan_dose
from nas_dose.errors import NasDoseError
from nas_dose.progress import set_quiet

SPARED = [o for o in OARS if o != "Mandible"]


def test_parse_checks_names_and_ranges():
    assert preferences.parse("oar=0.7, hi=0.05") == {"oar": 0.7, "hi": 0.05}
    np.testing.assert_allclose(preferences.check({"hi": 0.1, "oar": 1.0}), [1.0, 0.1])
    np.testing.assert_allclose(preferences.normalize(np.array([0.5, 0.25])), [0.5, 0.25])
    for text, message in (("oar=1.5", r"oar=1.5 is out of its range \[0, 1\]"), ("gtv=1", "unknown preference 'gtv'"),
                          ("oar", "expected name=value"), ("oar=x", "'x' is not a number"),
                          ("oar=1,oar=0", "given twice"), ("", "no preference given"), ("hi=nan", "out of its range")):
        with pytest.raises(NasDoseError, match=message):
            preferences.parse(text)
    with pytest.raises(NasDoseError, match="'hi' not given"):
        preferences.check({"oar": 0.2})


def test_homogeneity_index_is_icru83():
    dose = np.linspace(60.0, 80.0, 101)
    d2, d50, d98 = np.percentile(dose, [98, 50, 2])
    assert preferences.homogeneity_index(dose, np.ones(101, bool)) == pytest.approx((d2 - d98) / d50)
    assert preferences.homogeneity_index(dose, np.zeros(101, bool)) == 0.0


def _phantom(index: int, grid: int):
    """What synth_patient plans on, for sweeping one knob of the same plan."""
    rng = np.random.default_rng(np.random.SeedSequence([0, index]))
    a, plan = anatomy.draw_anatomy(rng), anatomy.draw_plan(rng)
    coords = anatomy.axes(grid)
    _, near, fields = anatomy.structure_fields(a, coords, anatomy.voxel_mm(grid)[0])
    structures = {n: anatomy.scatter_mask(m, near) for n, m in anatomy.voxelize(fields, a).items()}
    hu = np.full(near.shape, -1024.0, dtype=np.float32)
    hu[near] = anatomy.hounsfield(fields, a, grid)
    return lambda **knobs: plan_dose(coords, grid, hu, structures, {**plan, **knobs}), structures


def test_spared_oar_dose_falls_as_the_oar_weight_rises():
    for index in range(4):
        dose_of, structures = _phantom(index, 16)
        spared = [o for o in SPARED if o in structures and structures[o].any()]
        means = np.array([[dose_of(oar=w, hi_goal=0.1)[structures[o]].mean() for o in spared]
                          for w in (0.0, 0.25, 0.5, 0.75, 1.0)])
        assert (np.diff(means.mean(axis=1)) < 0).all(), index  # strictly, over the spared OARs
        assert (means[-1] <= means[0] + 1e-3).all(), index  # and no OAR gets more at the hardest sparing
        assert means.mean(axis=1)[-1] < 0.8 * means.mean(axis=1)[0]


def test_measured_hi_rises_with_the_homogeneity_goal():
    for index in range(4):
        dose_of, structures = _phantom(index, 32)
        hi = [preferences.homogeneity_index(dose_of(oar=0.5, hi_goal=h), structures["PTV70"]) for h in (0.0, 0.15, 0.3)]
        assert hi[0] < hi[1] < hi[2], (index, hi)
        assert hi[2] - hi[0] > 0.04, (index, hi)


def test_synthetic_plans_carry_their_measured_preferences():
    p = synth_patient(0, 16, seed=3, preferences=6)
    plain = synth_patient(0, 16, seed=3)
    np.testing.assert_array_equal(p.dose, plain.dose)  # the phantom is the same with or without plans
    assert plain.plans is None and p.plans is not None and p.plans.names == ("oar", "hi")
    assert p.plans.doses.shape == (6, 16, 16, 16) and p.plans.values.shape == (6, 2)
    oar, hi = p.plans.values.T
    # One OAR weight in each sixth of [0, 1] (a stratified draw), HI as its dose measures it.
    np.testing.assert_array_equal(np.sort((oar * 6).astype(int)), np.arange(6))
    for dose, value in zip(p.plans.doses, hi):
        assert value == pytest.approx(preferences.homogeneity_index(dose, p.structures["PTV70"]), abs=1e-6)
        assert (dose[~p.possible_dose_mask] == 0).all()
    # The homogeneity goal varies too: it hardly moves the OARs outside the targets.
    spared = np.logical_or.reduce([p.structures[o] for o in SPARED if o in p.structures]) & ~_targets(p)
    assert spearmanr(oar, p.plans.doses[:, spared].mean(axis=1))[0] == pytest.approx(-1.0)
    again = synth_patient(0, 16, seed=3, preferences=6)
    np.testing.assert_array_equal(again.plans.doses, p.plans.doses)
    assert not np.array_equal(synth_patient(0, 16, seed=4, preferences=6).plans.values, p.plans.values)
    with pytest.raises(NasDoseError, match="preference plans must be >= 0"):
        synth_patient(0, 16, 0, preferences=-1)


def _targets(p) -> np.ndarray:
    return np.logical_or.reduce([p.structures[t] for t in TARGETS if t in p.structures])


def test_plans_round_trip_through_the_data_set(tmp_path):
    path = tmp_path / "d.h5"
    patients = list(synth_patients(3, 16, seed=1, preferences=2))
    write_dataset(path, patients, source="synth", grid=16)
    with open_data(path) as data:
        for p in patients:
            assert data.n_plans(p.id) == 2
            names, values = data.plan_preferences(p.id)
            assert names == ("oar", "hi")
            np.testing.assert_array_equal(values, p.plans.values)
            np.testing.assert_array_equal(data.read_plan(p.id, 1), p.plans.doses[1])
            np.testing.assert_array_equal(data.read_plans(p.id).doses, p.plans.doses)
            np.testing.assert_array_equal(data.read(p.id).dose, p.dose)
    plain = tmp_path / "plain.h5"
    write_dataset(plain, synth_patients(2, 16, seed=1), source="synth", grid=16)
    with open_data(plain) as data:
        assert data.n_plans("pt_1") == 0 and data.read_plans("pt_1") is None
        with pytest.raises(NasDoseError, match="pt_1: no preference plans"):
            data.read_plan("pt_1", 0)


def test_synth_command_writes_plans(tmp_path, capsys):
    out = tmp_path / "p.h5"
    try:
        assert cli.main(["data", "synth", str(out), "--patients", "2", "--preferences", "3", "--grid", "16",
                         "-q"]) == 0
        capsys.readouterr()
        assert cli.main(["data", "info", str(out)]) == 0
    finally:
        set_quiet(False)
    text = capsys.readouterr().out
    assert "preference plans: 6 on 2 patients (oar 0." in text and ", hi 0." in text
    with open_data(out) as data:
        assert [data.n_plans(pid) for pid in data.ids()] == [3, 3]


def test_sparing_scale_ranks_a_plan_in_its_population():
    scale = SparingScale([{"SpinalCord": 10.0, "Larynx": 40.0}, {"SpinalCord": 20.0}, {"SpinalCord": 30.0}])
    assert scale.sparing({"SpinalCord": 5.0}) == 1.0 and scale.sparing({"SpinalCord": 35.0}) == 0.0
    assert scale.sparing({"SpinalCord": 20.0}) == pytest.approx(0.5)
    assert scale.sparing({"SpinalCord": 35.0, "Larynx": 1.0}) == pytest.approx(0.5)  # the mean over its OARs
    assert scale.sparing({"Brainstem": 3.0}) == 0.5  # no OAR the population knows
    with pytest.raises(NasDoseError, match="no plan of the population has a spared OAR"):
        SparingScale([{}])


def test_measured_preferences_of_real_plans(openkbp_dir):
    """OpenKBP plans: HI of the PTV70 in a clinical range, and the measured sparing spans the slider."""
    files = sorted((openkbp_dir / "npz128" / "train").glob("pt_*.npz"))[:12]
    patients = [read_npz_patient(f) for f in files]
    scale = SparingScale(spared_mean_doses(p.dose, p.structures) for p in patients)
    measured = np.array([scale.measure(p.dose, p.structures) for p in patients if "PTV70" in p.structures])
    assert len(measured) >= 8
    assert 0.02 < np.median(measured[:, 1]) < 0.3
    assert measured[:, 0].min() < 0.35 and measured[:, 0].max() > 0.65
