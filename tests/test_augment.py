import numpy as np
import pytest
from scipy import ndimage

from nas_dose.config import ConfigError, from_dict
from nas_dose.data.augment import AugmentConfig, ChannelLayout, Transform, apply_transform, augment, sample_transform
from nas_dose.data.dataset import CHANNELS, INPUT_LAYOUT, ITEM_KINDS
from nas_dose.errors import NasDoseError

G = 16
ALWAYS = AugmentConfig(probability=1.0)
RIGHT, LEFT = CHANNELS.index("RightParotid"), CHANNELS.index("LeftParotid")


def _blob(rng, centre, radius, g=G):
    idx = np.indices((g, g, g)).transpose(1, 2, 3, 0)
    return (np.linalg.norm(idx - np.asarray(centre), axis=-1) <= radius).astype(np.float32)


def _input(seed=0):
    """A model input: CT with air around a body, PTV levels, masks; the right parotid sits at
    low axis-1 indices (the patient's right), the left one at high indices."""
    rng = np.random.default_rng(seed)
    x = np.zeros((len(CHANNELS), G, G, G), np.float32)
    body = _blob(rng, (7.5, 7.5, 7.5), 7)
    x[0] = np.where(body > 0, rng.uniform(-0.2, 0.4, (G, G, G)), -1.024)
    x[1] = np.maximum(0.8 * _blob(rng, (8, 8, 8), 4), _blob(rng, (8, 8, 8), 2))
    for c in range(2, len(CHANNELS) - 1):
        x[c] = _blob(rng, rng.uniform(4, 12, 3), 2.5)
    x[RIGHT] = _blob(rng, (6, 3, 8), 2)
    x[LEFT] = 0
    x[-1] = _blob(rng, (8, 8, 8), 6)
    return x


def _item(seed=0):
    x = _input(seed)
    dose = np.random.default_rng(seed).uniform(0.1, 1.0, (1, G, G, G)).astype(np.float32) * x[-1:]
    return {"input": x, "target": dose, "mask": x[-1:].copy()}


@pytest.mark.parametrize("flips", [(True, False), (False, True), (True, True)])
def test_flipping_twice_is_the_identity(flips):
    item = _item()
    once = apply_transform(item, ITEM_KINDS, Transform(flips=flips))
    assert not np.array_equal(once["input"], item["input"])
    twice = apply_transform(once, ITEM_KINDS, Transform(flips=flips))
    for name in item:
        np.testing.assert_array_equal(twice[name], item[name])


def test_right_left_flip_moves_voxels_and_swaps_the_parotids():
    x = _input()
    out = apply_transform({"input": x}, {"input": INPUT_LAYOUT}, Transform(flips=(False, True)))["input"]
    np.testing.assert_array_equal(out[LEFT], x[RIGHT][:, ::-1])  # the right parotid, mirrored, is now left
    np.testing.assert_array_equal(out[RIGHT], x[LEFT][:, ::-1])
    np.testing.assert_array_equal(out[0], x[0][:, ::-1])
    assert out[LEFT][:, G // 2:].sum() > 0 and out[LEFT][:, :G // 2].sum() == 0


@pytest.mark.parametrize("flips, swapped", [((True, False), True), ((True, True), False)])
def test_parotids_follow_handedness(flips, swapped):
    """An anterior-posterior flip also mirrors the patient; two flips are a rotation, which
    does not, so the parotid labels stay."""
    x = _input()
    out = apply_transform({"input": x}, {"input": INPUT_LAYOUT}, Transform(flips=flips))["input"]
    assert (out[LEFT].sum() > 0) == swapped
    assert (out[RIGHT].sum() > 0) != swapped


def test_rotation_by_90_degrees_is_rot90_and_four_return_to_the_start():
    item = _item()
    quarter = Transform(angle_deg=90.0)
    once = apply_transform(item, ITEM_KINDS, quarter)
    np.testing.assert_array_equal(once["mask"], np.rot90(item["mask"], 1, axes=(1, 2)))
    np.testing.assert_allclose(once["target"], np.rot90(item["target"], 1, axes=(1, 2)), atol=1e-6)
    out = item
    for _ in range(4):
        out = apply_transform(out, ITEM_KINDS, quarter)
    np.testing.assert_array_equal(out["mask"], item["mask"])
    np.testing.assert_array_equal(out["input"][1:], item["input"][1:])


@pytest.mark.parametrize("angle", [40.0, 80.0, 200.0, 320.0])
@pytest.mark.parametrize("kind", ["mask", "continuous", "ct"])
def test_rotation_resamples_as_scipy_affine_transform(kind, angle):
    # The gathered rows must give what 3D spline resampling of the same rotation gives: nearest
    # neighbour for masks, linear otherwise, the background outside the rotated input.
    rng = np.random.default_rng(0)
    vol = rng.random((1, 12, 10, 6)).astype(np.float32)
    if kind == "mask":
        vol = (vol > 0.5).astype(np.float32)
    theta = np.radians(angle)
    cos, sin = round(np.cos(theta), 12), round(np.sin(theta), 12)
    matrix = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
    centre = (np.array(vol.shape[1:], dtype=float) - 1) / 2
    background = float(vol.min()) if kind == "ct" else 0.0
    expected = ndimage.affine_transform(vol[0], matrix, offset=centre - matrix @ centre, mode="constant",
                                        order=0 if kind == "mask" else 1, cval=background)
    out = apply_transform({"v": vol}, {"v": kind}, Transform(angle_deg=angle))["v"][0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert (out == background).sum() > 0  # corners fell outside the input


def test_rotation_keeps_the_axial_axis_and_the_centre():
    vol = np.zeros((1, G, G, G), np.float32)
    vol[0, 7:9, 7:9, 3] = 1  # a column segment through the centre of the plane, at slice 3
    out = apply_transform({"m": vol}, {"m": "mask"}, Transform(angle_deg=40.0))["m"]
    assert out[0, :, :, 3].sum() > 0 and out[0, :, :, np.r_[0:3, 4:G]].sum() == 0
    assert out[0, 7:9, 7:9, 3].all()


def test_masks_stay_binary_and_levels_stay_levels():
    item = _item()
    for seed in range(4):
        out = augment(item, ITEM_KINDS, ALWAYS, np.random.default_rng(seed))
        assert set(np.unique(out["mask"])) <= {0.0, 1.0}
        assert set(np.unique(out["input"][2:])) <= {0.0, 1.0}
        assert set(np.unique(out["input"][1])) <= {0.0, np.float32(0.8), 1.0}
        assert 0 < out["mask"].sum()


def test_ct_background_is_air_and_shift_moves_voxels():
    item = _item()
    t = Transform(shift=(2, -3, 1))
    out = apply_transform(item, ITEM_KINDS, t)
    np.testing.assert_array_equal(out["input"][0, 2:, :-3, 1:], item["input"][0, :-2, 3:, :-1])
    np.testing.assert_array_equal(out["target"][0, 2:, :-3, 1:], item["target"][0, :-2, 3:, :-1])
    assert np.all(out["input"][0, :2] == np.float32(-1.024))  # air moved in, not zero
    assert np.all(out["target"][0, :2] == 0) and np.all(out["input"][0, :, -3:] == np.float32(-1.024))
    rotated = apply_transform(item, ITEM_KINDS, Transform(angle_deg=40.0))
    assert rotated["input"][0, 0, 0, 0] == np.float32(-1.024)


def test_same_transform_for_every_array():
    """Copies of input channels, under their own kinds, stay equal to the channels."""
    x = _input()
    arrays = {"input": x, "ct": x[:1].copy(), "mask": x[-1:].copy(), "ptv": x[1].copy()}
    kinds = {"input": INPUT_LAYOUT, "ct": "ct", "mask": "mask", "ptv": "mask"}
    for seed in range(6):
        out = augment(arrays, kinds, ALWAYS, np.random.default_rng(seed))
        np.testing.assert_array_equal(out["ct"], out["input"][:1])
        np.testing.assert_array_equal(out["mask"], out["input"][-1:])
        np.testing.assert_array_equal(out["ptv"], out["input"][1])


def test_determinism_by_seed():
    item = _item()
    a = augment(item, ITEM_KINDS, ALWAYS, np.random.default_rng(7))
    b = augment(item, ITEM_KINDS, ALWAYS, np.random.default_rng(7))
    c = augment(item, ITEM_KINDS, ALWAYS, np.random.default_rng(8))
    for name in item:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["input"], c["input"])


def test_disabled_config_is_the_identity():
    item = _item()
    out = augment(item, ITEM_KINDS, AugmentConfig(enabled=False), np.random.default_rng(0))
    for name in item:
        assert out[name] is item[name]
    nothing = AugmentConfig(probability=0.0)
    assert sample_transform(nothing, np.random.default_rng(0)) == Transform()


def test_sampled_transforms_cover_the_configured_range():
    cfg = AugmentConfig(probability=1.0, rotation_step_deg=40.0, max_shift=2)
    transforms = [sample_transform(cfg, np.random.default_rng(s)) for s in range(200)]
    assert {t.angle_deg for t in transforms} == {40.0 * k for k in range(1, 9)}
    assert {s for t in transforms for s in t.shift} == {-2, -1, 0, 1, 2}
    assert all(t.flips == (True, True) for t in transforms)
    no_flip = AugmentConfig(flip=False, rotate=False, max_shift=0, probability=1.0)
    assert sample_transform(no_flip, np.random.default_rng(0)) == Transform()
    half = [sample_transform(AugmentConfig(), np.random.default_rng(s)) for s in range(400)]
    assert 0.4 < np.mean([t.flips[1] for t in half]) < 0.6


def test_bool_masks_are_supported():
    m = _input()[-1:] > 0
    out = apply_transform({"m": m}, {"m": "mask"}, Transform(flips=(True, False), angle_deg=80.0,
                                                            shift=(1, 1, 0)))["m"]
    assert out.dtype == bool and 0 < out.sum()


@pytest.mark.parametrize("arrays, kinds, message", [
    ({"a": np.zeros((2, 4, 4, 4))}, {}, "no kind given for array 'a'"),
    ({"a": np.zeros((2, 4, 4, 4))}, {"a": "dose"}, "unknown kind 'dose'"),
    ({"a": np.zeros((4, 4))}, {"a": "mask"}, "needs 3 spatial axes"),
    ({"a": np.zeros((1, 4, 4, 4)), "b": np.zeros((1, 4, 4, 5))}, {"a": "mask", "b": "mask"},
     "spatial shape"),
    ({"a": np.zeros((3, 4, 4, 4))}, {"a": ChannelLayout(("ct", "mask"))}, "does not match"),
])
def test_bad_arrays_are_errors(arrays, kinds, message):
    with pytest.raises(NasDoseError, match=message):
        augment(arrays, kinds, ALWAYS, np.random.default_rng(0))


@pytest.mark.parametrize("key, value", [("probability", 1.5), ("rotation_step_deg", 0),
                                        ("rotation_step_deg", 360), ("max_shift", -1)])
def test_config_is_validated(key, value):
    with pytest.raises(ConfigError, match=key):
        from_dict(AugmentConfig, {key: value})
