"""Synthetic phantoms: determinism, OpenKBP conventions, plausible plans, learnability."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nas_dose.data import synth
from nas_dose.data.patient import PRESCRIPTION_GY, ROIS, TARGETS
from nas_dose.data.synth import split_for, synth_patient, synth_patients
from nas_dose.errors import NasDoseError

N, GRID, SEED = 16, 32, 0


@pytest.fixture(scope="module")
def cohort() -> list:
    return list(synth_patients(N, GRID, SEED))


def _targets(p) -> np.ndarray:
    return np.logical_or.reduce([p.structures[t] for t in TARGETS if t in p.structures])


def test_arrays_follow_openkbp_conventions(cohort):
    p = cohort[0]
    assert p.id == "pt_1" and [q.id for q in cohort[-2:]] == ["pt_15", "pt_16"]
    assert p.voxel_mm == pytest.approx((15.624, 15.624, 10.0))
    assert p.ct.shape == p.dose.shape == p.possible_dose_mask.shape == (GRID,) * 3
    assert p.ct.dtype == p.dose.dtype == np.float32
    assert p.possible_dose_mask.dtype == bool
    assert set(p.structures) <= set(ROIS)
    assert all(m.dtype == bool and m.shape == (GRID,) * 3 for m in p.structures.values())
    assert p.attrs["source"] == "synth:seed=0"


def test_ct_values_are_hu_plus_1024(cohort):
    for p in cohort[:4]:
        ct = p.ct
        assert ct.min() >= 0 and ct.max() <= 4095
        # Air around the patient is exactly 0, as OpenKBP stores it.
        assert ct[0, 0, 0] == 0 and ct[-1, -1, -1] == 0
        inside = ndimage.binary_erosion(ct > 0, iterations=2)
        soft = np.median(ct[inside])
        assert 1024 + 0 < soft < 1024 + 90  # soft tissue about +40 HU
        assert ct[inside].max() > 1024 + 600  # bone
        assert (ct[inside] < 1024 - 600).any()  # the air-filled airway


def test_same_seed_same_patient_other_seed_differs():
    a, b = synth_patient(3, 16, seed=5), synth_patient(3, 16, seed=5)
    for x, y in ((a.ct, b.ct), (a.dose, b.dose), (a.possible_dose_mask, b.possible_dose_mask)):
        np.testing.assert_array_equal(x, y)
    assert a.structures.keys() == b.structures.keys()
    for name in a.structures:
        np.testing.assert_array_equal(a.structures[name], b.structures[name])
    c = synth_patient(3, 16, seed=6)
    assert not np.array_equal(a.dose, c.dose) and not np.array_equal(a.ct, c.ct)
    d = synth_patient(4, 16, seed=5)
    assert not np.array_equal(a.dose, d.dose)


def test_patient_does_not_depend_on_cohort_size(cohort):
    alone = synth_patient(N - 1, GRID, SEED)
    np.testing.assert_array_equal(alone.dose, cohort[N - 1].dose)
    np.testing.assert_array_equal(alone.ct, cohort[N - 1].ct)
    first_of_three = next(iter(synth_patients(3, GRID, SEED)))
    np.testing.assert_array_equal(first_of_three.dose, cohort[0].dose)


def test_split_rule():
    assert [split_for(i, 2) for i in range(2)] == ["train", "validation"]
    assert [split_for(i, 5) for i in range(5)] == ["train"] * 4 + ["validation"]
    ten = [split_for(i, 10) for i in range(10)]
    assert (ten.count("train"), ten.count("validation"), ten.count("test")) == (7, 2, 1)
    many = [split_for(i, 24) for i in range(24)]
    assert (many.count("train"), many.count("validation"), many.count("test")) == (17, 5, 2)
    assert all(split_for(i, 9) != "test" for i in range(9))
    splits = [p.attrs["split"] for p in synth_patients(2, 16, 1)]
    assert splits == ["train", "validation"]


def test_unlabeled_patients_come_after_the_cohort_without_their_dose(cohort):
    more = list(synth_patients(N, GRID, SEED, unlabeled=2))
    assert [p.attrs["split"] for p in more[N:]] == ["unlabeled"] * 2 and [p.id for p in more[N:]] == ["pt_17", "pt_18"]
    assert all(p.dose is None for p in more[N:])
    np.testing.assert_array_equal(more[N].ct, synth_patient(N, GRID, SEED).ct)  # the patient pt_17 would be
    for a, b in zip(more[:N], cohort):  # the labeled cohort is unchanged
        assert a.attrs == b.attrs and np.array_equal(a.dose, b.dose)


def test_cohort_carries_split_and_source(cohort):
    splits = [p.attrs["split"] for p in cohort]
    assert [splits.count(s) for s in ("train", "validation", "test")] == [11, 3, 2]
    assert {p.attrs["source"] for p in cohort} == {"synth:seed=0"}


@pytest.mark.parametrize("call", [
    lambda: synth_patient(0, 24, 0),
    lambda: synth_patient(0, 8, 0),
    lambda: synth_patient(0, 256, 0),
    lambda: synth_patient(0, True, 0),
    lambda: synth_patient(-1, 32, 0),
    lambda: synth_patient(0, 32, -3),
    lambda: next(synth_patients(1, 32, 0)),
    lambda: next(synth_patients(0, 32, 0)),
    lambda: next(synth_patients(4, 48, 0)),
    lambda: next(synth_patients(4, 32, 0, unlabeled=-1)),
    lambda: split_for(0, 1),
])
def test_invalid_arguments_raise(call):
    with pytest.raises(NasDoseError):
        call()


def test_mask_is_where_dose_is_positive_inside_body(cohort):
    for p in cohort:
        mask = p.possible_dose_mask
        np.testing.assert_array_equal(mask, p.dose > 0)
        assert (p.dose[~mask] == 0).all() and (p.dose >= 0).all()
        assert (p.ct[mask] > 0).all()  # never in the air around the patient
        assert (mask | ~_targets(p)).all()  # every target voxel may receive dose
        body = (p.ct > 600).sum()
        assert 0.15 * body < mask.sum() < body


def test_prescriptions_are_met(cohort):
    means, d95 = {t: [] for t in TARGETS}, {t: [] for t in TARGETS}
    for p in cohort:
        for t in TARGETS:
            if t in p.structures:
                dose = p.dose[p.structures[t]]
                means[t].append(dose.mean())
                d95[t].append(np.percentile(dose, 5))
        ptv70 = p.dose[p.structures["PTV70"]]
        assert 0.99 * 70 <= ptv70.mean() <= 1.04 * 70
        assert np.percentile(ptv70, 5) >= 0.9 * 70
        assert ptv70.max() <= 1.2 * 70
    assert np.median([p.dose[p.structures["PTV70"]].max() for p in cohort]) <= 1.15 * 70
    assert np.mean(d95["PTV70"]) >= 0.94 * 70
    for t in ("PTV63", "PTV56"):
        rx = PRESCRIPTION_GY[t]
        assert len(means[t]) >= 3
        assert rx <= np.mean(means[t]) <= 1.12 * rx
        assert np.mean(d95[t]) >= 0.9 * rx
    assert np.mean(means["PTV70"]) > np.mean(means["PTV63"]) > np.mean(means["PTV56"])


def test_parotids_are_spared(cohort):
    parotid = [p.dose[p.structures[o]].mean() for p in cohort
               for o in ("RightParotid", "LeftParotid") if o in p.structures]
    assert len(parotid) >= 20
    assert np.mean(parotid) < 0.5 * 70
    cord = [p.dose[p.structures["SpinalCord"]].max() for p in cohort
            if "SpinalCord" in p.structures]
    assert np.median(cord) < 0.8 * 70


def test_oar_sparing_lowers_oar_dose():
    """The same plan computed without the OARs gives them more dose, the targets about the same."""
    lower, coverage = [], []
    for index in range(4):
        p = synth_patient(index, GRID, SEED)
        rng = np.random.default_rng(np.random.SeedSequence([SEED, index]))
        synth.anatomy.draw_anatomy(rng)
        plan = synth.anatomy.draw_plan(rng)
        coords, hu = synth.anatomy.axes(GRID), p.ct - 1024.0
        spared = synth.beam.plan_dose(coords, GRID, hu, p.structures, plan)
        blind = synth.beam.plan_dose(coords, GRID, hu, {t: m for t, m in p.structures.items()
                                                    if t in TARGETS}, plan)
        oars = [o for o in ("RightParotid", "LeftParotid", "SpinalCord") if o in p.structures]
        for o in oars:
            m = p.structures[o] & p.possible_dose_mask & ~_targets(p)
            if blind[m].mean() > 5.0:
                lower.append(spared[m].mean() / blind[m].mean())
        ptv = p.structures["PTV70"]
        coverage.append(np.percentile(spared[ptv], 5) / np.percentile(blind[ptv], 5))
    assert len(lower) >= 6
    assert np.mean(lower) < 0.85 and max(lower) < 1.0
    assert np.mean(coverage) > 0.95


def test_structures_present_and_nonempty_at_grid_16():
    present = {name: 0 for name in ROIS}
    for index in range(12):
        small = synth_patient(index, 16, SEED)
        assert "PTV70" in small.structures
        for name, mask in small.structures.items():
            assert mask.any(), (index, name)
            present[name] += 1
        big = synth_patient(index, 32, SEED) if index < 3 else None
        if big is not None:
            assert big.structures.keys() == small.structures.keys()
        assert small.possible_dose_mask.any() and small.dose.max() > 60
    # Random presence, as in real data: the core OARs nearly always, PTV63/Larynx sometimes.
    assert present["PTV70"] == 12 and present["SpinalCord"] >= 10
    assert 0 < present["PTV63"] < 12 and 0 < present["Esophagus"] < 12


def test_same_anatomy_across_grids():
    for index in (0, 1):
        a, b = synth_patient(index, 32, SEED), synth_patient(index, 64, SEED)
        vol_a, vol_b = (np.prod(p.voxel_mm) * p.structures["PTV70"].sum() for p in (a, b))
        assert vol_a == pytest.approx(vol_b, rel=0.15)
        centre_a = np.array(ndimage.center_of_mass(a.structures["PTV70"])) * a.voxel_mm
        centre_b = np.array(ndimage.center_of_mass(b.structures["PTV70"])) * b.voxel_mm
        # Voxel centres sit at (i + 0.5) * voxel: compare in physical millimetres.
        shift = (centre_a + np.array(a.voxel_mm) / 2) - (centre_b + np.array(b.voxel_mm) / 2)
        assert np.abs(shift).max() < 5.0
        body_a, body_b = (np.prod(p.voxel_mm) * (p.ct > 600).sum() for p in (a, b))
        assert body_a == pytest.approx(body_b, rel=0.05)
        coarse = b.dose.reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
        inner = ndimage.binary_erosion(a.possible_dose_mask, iterations=1)
        assert np.abs(coarse[inner] - a.dose[inner]).mean() < 3.0


def test_anatomy_is_where_it_belongs(cohort):
    for p in cohort:
        s = {n: np.array(ndimage.center_of_mass(m)) for n, m in p.structures.items()}
        if {"RightParotid", "LeftParotid"} <= s.keys():
            # Patient's right is the low axis-1 index.
            assert s["RightParotid"][1] < GRID / 2 < s["LeftParotid"][1]
        if {"Brainstem", "Larynx"} <= s.keys():
            assert s["Brainstem"][2] < s["Larynx"][2]  # superior is the low axis-2 index
        if {"SpinalCord", "Larynx"} <= s.keys():
            assert s["SpinalCord"][0] > s["Larynx"][0]  # posterior is the high axis-0 index
        if "Mandible" in s:
            assert s["Mandible"][0] < s["SpinalCord"][0]


def test_cohort_is_varied(cohort):
    volumes = [p.structures["PTV70"].sum() for p in cohort]
    assert np.std(volumes) > 0.2 * np.mean(volumes)
    centres = np.array([ndimage.center_of_mass(p.structures["PTV70"]) for p in cohort])
    assert centres.std(axis=0).min() > 0.5  # voxels at grid 32
    assert len({tuple(sorted(p.structures)) for p in cohort}) >= 5
    assert len({round(float(p.dose[p.possible_dose_mask].mean())) for p in cohort}) >= 8


def _features(p) -> tuple[np.ndarray, np.ndarray]:
    """Hand features inside the mask: PTV map and exponentials of distances to the targets."""
    s, mask = p.structures, p.possible_dose_mask
    ptv = np.zeros(mask.shape, np.float32)
    for name, level in (("PTV56", 0.8), ("PTV63", 0.9), ("PTV70", 1.0)):
        if name in s:
            ptv[s[name]] = level
    d70 = ndimage.distance_transform_edt(~s["PTV70"], sampling=p.voxel_mm)
    d_any = ndimage.distance_transform_edt(ptv == 0, sampling=p.voxel_mm)
    columns = [np.ones_like(ptv), ptv] + [np.exp(-d / w) for d in (d70, d_any) for w in (10, 30)]
    return np.stack([c[mask] for c in columns], axis=1), p.dose[mask]


def test_dose_is_learnable_but_not_trivial(cohort):
    train = [_features(p) for p in cohort if p.attrs["split"] == "train"]
    held = [_features(p) for p in cohort if p.attrs["split"] != "train"]
    x = np.concatenate([f for f, _ in train])
    y = np.concatenate([d for _, d in train])
    w, *_ = np.linalg.lstsq(x, y, rcond=None)
    mean_mae = np.mean([np.abs(d - y.mean()).mean() for _, d in held])
    fit_mae = np.mean([np.abs(f @ w - d).mean() for f, d in held])
    assert mean_mae > 10.0
    assert fit_mae < 0.65 * mean_mae  # geometry explains most of the dose...
    assert fit_mae > 4.0  # ...but not all: something left for a network to learn
