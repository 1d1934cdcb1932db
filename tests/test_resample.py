import numpy as np
import pytest
import torch

from nas_dose.data.patient import Patient
from nas_dose.data.resample import downsample_patient, resample_factor, upsample_dose
from nas_dose.errors import NasDoseError


def hand_made() -> Patient:
    """4³ patient whose 2³ blocks have hand-checkable means."""
    ct = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    mask = np.zeros((4, 4, 4), bool)
    dose = np.zeros((4, 4, 4), np.float32)
    mask[0, 0, 0], dose[0, 0, 0] = True, 10.0       # block (0,0,0): two in-mask voxels
    mask[1, 1, 1], dose[1, 1, 1] = True, 20.0
    mask[2:, 2:, 2:], dose[2:, 2:, 2:] = True, 50.0  # block (1,1,1): full
    dose[0, 3, 0] = 5.0                             # outside the mask: ignored
    oar = np.zeros((4, 4, 4), bool)
    oar[3, 0, 1] = True                             # a single-voxel OAR
    return Patient("pt_1", ct, mask, {"Brainstem": oar, "PTV70": mask.copy()}, (3.0, 3.0, 2.5),
                   dose, {"split": "train", "source": "x"})


def test_resample_factor():
    assert resample_factor(128, 32) == 4 and resample_factor(128, 128) == 1
    with pytest.raises(NasDoseError, match="grid 48: does not divide the source grid 128"):
        resample_factor(128, 48)
    with pytest.raises(NasDoseError, match="grid 0"):
        resample_factor(128, 0)


def test_downsample_hand_made_case_exactly():
    p = hand_made()
    q = downsample_patient(p, 2)
    # CT: block mean; block (i,j,k) of arange(64).reshape(4,4,4) has mean 32i + 8j + 2k + 10.5.
    i, j, k = np.indices((2, 2, 2))
    assert q.ct.dtype == np.float32 and np.array_equal(q.ct, 32 * i + 8 * j + 2 * k + 10.5)
    expected_dose = np.zeros((2, 2, 2), np.float32)
    expected_dose[0, 0, 0], expected_dose[1, 1, 1] = 15.0, 50.0
    assert q.dose.dtype == np.float32 and np.array_equal(q.dose, expected_dose)
    assert np.flatnonzero(q.possible_dose_mask).tolist() == [0, 7]
    assert np.flatnonzero(q.structures["Brainstem"]).tolist() == [4]  # block (1,0,0) keeps the OAR
    assert np.array_equal(q.structures["PTV70"], q.possible_dose_mask)
    assert not (q.dose > 0)[~q.possible_dose_mask].any()
    assert q.voxel_mm == (6.0, 6.0, 5.0) and q.grid == 2
    assert q.attrs["resample_factor"] == 2 and q.attrs["source_grid"] == 4
    assert q.attrs["split"] == "train" and q.attrs["source"] == "x"
    assert q.source is p and "possible_dose_mask_source" not in q.attrs
    assert "resample_factor" not in p.attrs  # the input is left alone


def test_downsample_twice_composes_and_factor_one():
    p = Patient("a", np.zeros((8,) * 3, np.float32), np.ones((8,) * 3, bool), {}, (1.0, 1.0, 1.0))
    q = downsample_patient(downsample_patient(p, 2), 2)
    assert q.grid == 2 and q.voxel_mm == (4.0, 4.0, 4.0) and q.dose is None
    assert (q.attrs["resample_factor"], q.attrs["source_grid"]) == (4, 8)
    assert q.source is p  # the first grid, not the intermediate one
    same = downsample_patient(p, 1)
    assert same.ct is p.ct and same.attrs == {"resample_factor": 1, "source_grid": 8}
    with pytest.raises(NasDoseError, match="patient a: grid 8 is not divisible by the factor 3"):
        downsample_patient(p, 3)


def test_structure_of_one_voxel_survives_every_position():
    rng = np.random.default_rng(0)
    for _ in range(5):
        oar = np.zeros((16,) * 3, bool)
        where = tuple(rng.integers(0, 16, 3))
        oar[where] = True
        p = Patient("a", np.zeros((16,) * 3, np.float32), oar.copy(), {"Larynx": oar}, (1.0, 1.0, 1.0))
        q = downsample_patient(p, 4)
        assert np.argwhere(q.structures["Larynx"]).tolist() == [[w // 4 for w in where]]


def test_upsample_constant_ramp_and_torch_trilinear():
    assert np.array_equal(upsample_dose(np.full((3, 3, 3), 7.5, np.float32), 4), np.full((12,) * 3, 7.5))
    # A ramp sampled at cell centres is reproduced exactly between the outermost centres.
    coarse = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None], (4, 2, 2))
    fine = upsample_dose(coarse, 2)
    assert fine[:, 0, 0].tolist() == [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3]
    rng = np.random.default_rng(1)
    dose = rng.uniform(0, 70, (5, 5, 5)).astype(np.float32)
    reference = torch.nn.functional.interpolate(torch.from_numpy(dose)[None, None], scale_factor=3,
                                                mode="trilinear", align_corners=False)[0, 0].numpy()
    assert np.allclose(upsample_dose(dose, 3), reference, atol=1e-4)


def test_upsample_region_equals_the_whole_volumes_box():  # what a cascade's training patch reads
    rng = np.random.default_rng(3)
    for factor, n in ((2, 5), (3, 4), (4, 6)):
        dose = rng.uniform(-5, 70, (n, n + 1, n + 2)).astype(np.float32)
        whole = upsample_dose(dose, factor)
        for _ in range(20):
            box = []
            for side in whole.shape:
                start = int(rng.integers(0, side))
                box.append(slice(start, int(rng.integers(start + 1, side + 1))))
            region = tuple(box)
            # equal to float32 rounding: a box's local coordinates give the interpolation weights' last bit
            assert np.allclose(upsample_dose(dose, factor, region=region), whole[region], rtol=0, atol=1e-4)  # type: ignore[arg-type]
            mask = rng.random(whole[region].shape) < 0.5  # type: ignore[index]
            masked = upsample_dose(dose, factor, mask, region=region)  # type: ignore[arg-type]
            assert not masked[~mask].any() and np.allclose(masked[mask], whole[region][mask], rtol=0, atol=1e-4)  # type: ignore[index]
    with pytest.raises(NasDoseError, match="non-empty box"):
        upsample_dose(dose, 2, region=(slice(3, 3), slice(0, 2), slice(0, 2)))


def test_upsample_non_negative_and_masked():
    dose = np.array([[[-4.0, 8.0]]], np.float32).repeat(2, 0).repeat(2, 1)
    out = upsample_dose(dose, 2)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 8
    mask = np.zeros((4, 4, 4), bool)
    mask[..., 3] = True
    masked = upsample_dose(dose, 2, mask=mask)
    assert masked[..., :3].max() == 0 and np.array_equal(masked[..., 3], out[..., 3])
    with pytest.raises(NasDoseError, match="does not match"):
        upsample_dose(dose, 2, mask=np.ones((2, 2, 2), bool))


def test_downsample_then_upsample_of_smooth_field_is_close():
    g = 64
    x = (np.arange(g) + 0.5) / g
    a, b, c = np.meshgrid(x, x, x, indexing="ij")
    field = (40 + 20 * np.sin(2 * np.pi * a) * np.cos(np.pi * b) + 10 * c).astype(np.float32)
    p = Patient("a", field, np.ones((g,) * 3, bool), {}, (1.0, 1.0, 1.0), field)
    back = upsample_dose(downsample_patient(p, 4).dose, 4)
    inner = (slice(4, -4),) * 3
    assert np.abs(back - field)[inner].max() < 0.7  # of a 20 Gy modulation
    assert abs(back.mean() - field.mean()) < 0.05
