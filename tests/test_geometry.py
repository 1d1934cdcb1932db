"""Voxel geometry: NIfTI patients of any shape, voxel size and orientation onto the internal cube
(at a grid that does not divide 128) and predicted doses back onto their own grid and affine,
checked against nibabel's independent resampling and against the phantoms they were made from."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to
from scipy import ndimage

from nas_dose import cli
from nas_dose.data.geometry import (
    OPENKBP_DIRECTION,
    Geometry,
    dose_on_original,
    internal_geometry,
    patient_from_volumes,
    resample,
)
from nas_dose.data.nifti import openkbp_geometry
from nas_dose.data.openkbp import read_npz_patient
from nas_dose.data.patient import Patient
from nas_dose.data.store import open_data
from nas_dose.data.synth import synth_patients
from nas_dose.errors import NasDoseError

GRID = 48  # the training grid: not a divisor of 128


def rotation(axis: int, degrees: float) -> np.ndarray:
    """A rotation by `degrees` about LPS axis `axis`."""
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def oblique(centre: np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Geometry:
    """A grid centred on `centre` whose axes run roughly left, superior and anterior (so its
    axis order is none of OpenKBP's), turned 25 degrees about z and -12 about x."""
    base = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # columns: +L, -P (anterior), +S
    direction = rotation(2, 25) @ rotation(0, -12) @ base
    origin = centre - direction @ (np.asarray(spacing) * (np.asarray(shape) - 1) / 2)
    return Geometry(shape=shape, spacing=spacing, origin=tuple(origin), direction=tuple(direction.ravel()))


def nasdose(*argv: object) -> int:
    """The command line in this process (each call sets --quiet anew; conftest resets it after a test)."""
    return cli.main([*map(str, argv)])


def test_lps_convention_and_the_affine_round_trips():
    g = Geometry.from_ras_affine(np.diag([2.0, 3.0, 4.0, 1.0]), (5, 6, 7))  # axes along RAS +x, +y, +z
    assert g.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0) and g.spacing == (2.0, 3.0, 4.0)
    kbp = openkbp_geometry((4, 4, 4), (3.5, 3.0, 2.5))
    assert nib.aff2axcodes(kbp.ras_affine()) == ("P", "L", "I")
    g = oblique(np.array([10.0, -20.0, 30.0]), (9, 8, 7), (1.5, 2.0, 3.0))
    again = Geometry.from_ras_affine(g.ras_affine(), g.shape)
    np.testing.assert_allclose(again.affine(), g.affine(), atol=1e-12)
    assert Geometry.from_attrs(g.to_attrs("original"), "original") == g
    with pytest.raises(ValueError, match="not orthogonal"):
        Geometry.from_affine(np.array([[1.0, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), (2, 2, 2))


def test_internal_grid_covers_the_volume_in_openkbp_order():
    g = oblique(np.array([0.0, 0.0, 0.0]), (40, 30, 20), (4.0, 5.0, 6.0))
    cube = internal_geometry(g, GRID, spacing=3.0)
    assert cube.direction == OPENKBP_DIRECTION and cube.spacing == (3.0, 3.0, 3.0)
    assert cube.shape[0] % GRID == 0 and len(set(cube.shape)) == 1
    corners = np.array([[i, j, k, 1] for i in (-0.5, 39.5) for j in (-0.5, 29.5) for k in (-0.5, 19.5)])
    inside = np.linalg.solve(cube.affine(), g.affine() @ corners.T)[:3]  # the corners in cube indices
    assert inside.min() >= -0.5 and inside.max() <= cube.shape[0] - 0.5
    assert internal_geometry(g, GRID).spacing == (6.0, 6.0, 6.0)  # default: the coarsest voxel size
    # an axis-aligned cube the grid divides is only reoriented (and comes back exactly)
    aligned = openkbp_geometry((GRID,) * 3, (2.0, 2.0, 2.5))
    flipped = Geometry(aligned.shape, aligned.spacing, aligned.origin, tuple(-np.asarray(aligned.direction)))
    assert internal_geometry(flipped, GRID).shape == (GRID,) * 3
    volume = np.random.default_rng(0).normal(size=flipped.shape)
    inner = internal_geometry(flipped, GRID)
    np.testing.assert_array_equal(resample(resample(volume, flipped, inner), inner, flipped), volume)


def gaussian(g: Geometry, centre: np.ndarray, sigma: float, peak: float = 60.0) -> np.ndarray:
    """A smooth dose-like field sampled at the voxel centres of `g`."""
    ijk = np.stack(np.meshgrid(*map(np.arange, g.shape), indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ (g.matrix() * np.asarray(g.spacing)).T + np.asarray(g.origin)
    return (peak * np.exp(-((world - centre) ** 2).sum(axis=1) / (2 * sigma ** 2))).reshape(g.shape)


def test_a_smooth_field_goes_to_the_internal_grid_and_back_accurately():
    g = oblique(np.array([5.0, -10.0, 20.0]), (34, 26, 20), (5.0, 7.0, 6.0))
    peak_at = np.array([15.0, 0.0, 10.0])
    field = gaussian(g, peak_at, sigma=45.0)
    ct = np.zeros(g.shape)
    ptv = field > 30
    p = patient_from_volumes("pt_1", ct, {"PTV70": ptv}, field, g, grid=GRID, spacing=4.0,
                             possible_dose_mask=np.ones(g.shape, bool), attrs={"split": "train"})
    internal = Geometry.from_attrs(p.attrs, "internal")
    assert internal is not None and p.grid == internal.shape[0] == 2 * GRID and p.voxel_mm == (4.0, 4.0, 4.0)
    assert p.dose is not None
    inner = np.zeros(g.shape)
    inner[1:-1, 1:-1, 1:-1] = 1
    covered = resample(inner, g, internal) > 0.999  # interpolated, not extended from the edge voxels
    # Linear interpolation's error on 5-7 mm voxels, near the 60 Gy peak; a grid shifted by 2 mm
    # or turned would be off by several Gy.
    assert np.abs(p.dose - gaussian(internal, peak_at, sigma=45.0))[covered].max() < 0.5
    back, geometry = dose_on_original(p, p.dose)
    assert geometry == g and back.shape == g.shape and back.dtype == np.float32
    interior = (slice(1, -1),) * 3  # an edge voxel's internal neighbours are partly beyond the volume: 0
    assert np.abs(back - field)[interior].max() < 0.5 and np.abs(back - field)[interior].mean() < 0.1
    np.testing.assert_array_equal(p.structures["PTV70"], resample(ptv, g, internal) > 0.5)  # only its box is done
    assert float(p.structures["PTV70"].sum()) * 4 ** 3 == pytest.approx(float(ptv.sum()) * 5 * 7 * 6, rel=0.03)
    # the training grid (the cube block-averaged) is the same box in 8 mm voxels, and goes back too
    coarse = p.dose.reshape(GRID, 2, GRID, 2, GRID, 2).mean(axis=(1, 3, 5))
    whole = covered.reshape(GRID, 2, GRID, 2, GRID, 2).all(axis=(1, 3, 5))
    assert np.abs(coarse - gaussian(internal.resized(GRID), peak_at, sigma=45.0))[whole].max() < 0.6
    deep = (slice(2, -2),) * 3  # the blocks at the edge are averaged with the zeros outside
    assert np.abs(dose_on_original(p.attrs, coarse)[0] - field)[deep].max() < 1.2


def test_a_dose_on_its_own_grid_comes_in_and_goes_back_there():
    """As an RT Dose: the dose on a smaller axis-aligned grid than the CT's oblique one."""
    g = oblique(np.array([5.0, -10.0, 20.0]), (34, 26, 20), (5.0, 7.0, 6.0))
    dose_grid = Geometry(shape=(24, 20, 16), spacing=(5.5, 5.5, 6.5), origin=(-60.0, -60.0, -30.0),
                         direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    peak_at = np.array([15.0, 0.0, 10.0])
    p = patient_from_volumes("pt_1", np.zeros(g.shape), {}, gaussian(dose_grid, peak_at, 45.0), g, grid=GRID,
                             spacing=4.0, dose_geometry=dose_grid)
    internal = Geometry.from_attrs(p.attrs, "internal")
    assert internal is not None and p.dose is not None
    inner = np.zeros(dose_grid.shape)
    inner[1:-1, 1:-1, 1:-1] = 1
    covered = resample(inner, dose_grid, internal) > 0.999
    assert covered.sum() > 1000 and np.abs(p.dose - gaussian(internal, peak_at, 45.0))[covered].max() < 0.5
    assert p.dose[resample(np.ones(dose_grid.shape), dose_grid, internal) == 0].max() == 0  # none outside
    back, where = dose_on_original(p, p.dose, onto=dose_grid)
    assert where == dose_grid and back.shape == dose_grid.shape
    assert np.abs(back - gaussian(dose_grid, peak_at, 45.0))[1:-1, 1:-1, 1:-1].max() < 0.5


def test_volumes_off_the_geometry_are_refused():
    g = oblique(np.zeros(3), (6, 5, 4), (1.0, 1.0, 1.0))
    with pytest.raises(NasDoseError, match="patient pt_1: 'PTV70' has shape"):
        patient_from_volumes("pt_1", np.zeros(g.shape), {"PTV70": np.zeros((4, 5, 6))}, None, g, grid=4)


# --- end to end: oblique, anisotropic, non-cubic NIfTI phantoms at grid 48 ----------------------------


def write_oblique(folder: Path, p: Patient) -> Geometry:
    """Phantom `p` (on its OpenKBP grid, first voxel at the origin) resampled by nibabel onto an
    oblique, anisotropic, non-cubic grid over its middle, saved as a NIfTI folder."""
    source = openkbp_geometry(p.ct.shape, p.voxel_mm)
    centre = source.affine()[:3] @ [*(np.asarray(p.ct.shape) - 1) / 2, 1]
    g = oblique(centre, (30, 22, 36), (13.0, 14.5, 11.0))
    target = (g.shape, g.ras_affine())
    folder.mkdir(parents=True)

    def save(name: str, array: np.ndarray, order: int, fill: float = 0.0) -> None:
        image = resample_from_to(nib.Nifti1Image(array.astype(np.float32), source.ras_affine()), target, order=order,
                                 cval=fill)
        data = np.asarray(image.dataobj)
        stored = data.astype(np.uint8) if order == 0 else data
        nib.save(nib.Nifti1Image(stored, g.ras_affine()), folder / f"{name}.nii.gz")

    save("ct", p.ct - 1024, 1, -1024)
    assert p.dose is not None
    save("dose", p.dose, 1)
    save("possible_dose_mask", p.possible_dose_mask, 0)
    for roi, m in p.structures.items():
        save(roi, m, 0)
    return g


@pytest.fixture(scope="module")
def phantoms() -> list[Patient]:
    return list(synth_patients(3, 32, seed=4))


@pytest.fixture(scope="module")
def tree(phantoms, tmp_path_factory) -> tuple[Path, dict[str, Geometry]]:
    root = tmp_path_factory.mktemp("oblique")
    return root, {p.id: write_oblique(root / p.attrs["split"] / p.id, p) for p in phantoms}


@pytest.fixture(scope="module")
def imported(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "oblique48.h5"
    assert nasdose("data", "import", tree[0], out, "--grid", GRID, "--spacing", 7, "-q") == 0
    return out


def test_import_resamples_onto_a_cube_the_grid_divides_keeping_the_original_grid(phantoms, tree, imported, capsys):
    assert nasdose("data", "info", imported) == 0
    info = capsys.readouterr().out
    assert "resampled by 2 from the 96^3 grid: 3 patients" in info
    assert "resampled from their files' own voxel grid, which predictions go back to: 3 patients" in info
    with open_data(imported) as data:
        assert data.grid == GRID and data.ids() == [p.id for p in phantoms]
        for p in phantoms:
            attrs = data.patient_attrs(p.id)
            original = Geometry.from_attrs(attrs, "original")
            assert original is not None and original.shape == (30, 22, 36)
            ct = nib.load(tree[0] / attrs["split"] / p.id / "ct.nii.gz")
            np.testing.assert_allclose(original.ras_affine(), ct.affine, atol=1e-4)
            source = data.read_source(p.id)
            assert attrs["source_grid"] == 2 * GRID and source.voxel_mm == pytest.approx((7, 7, 7))
            # the PTV lands where it is in the phantom: same centroid in LPS millimetres
            internal = Geometry.from_attrs(attrs, "internal")
            assert internal is not None
            for roi in ("PTV70", "Brainstem"):
                if roi in p.structures and p.structures[roi].sum() > 20:
                    got = internal.affine()[:3] @ [*np.argwhere(source.structures[roi]).mean(axis=0), 1]
                    want = openkbp_geometry(p.ct.shape, p.voxel_mm).affine()[:3] @ [
                        *np.argwhere(p.structures[roi]).mean(axis=0), 1]
                    assert np.linalg.norm(got - want) < 5, roi  # mm (the phantom's voxels are 15.6 mm)


@pytest.fixture(scope="module")
def run48(imported, train_tiny, tmp_path_factory) -> Path:
    """A tiny U-Net trained one epoch at 48³ on the oblique phantoms."""
    return train_tiny(imported, tmp_path_factory.mktemp("runs") / "tiny48")


def predict_nifti(model: Path, data: Path, out: Path) -> None:
    assert nasdose("predict", "--model", model, "--data", data, "--out", out, "--format", "nifti", "-q",
                   "runtime.device=cpu", "runtime.threads=1") == 0


@pytest.fixture(scope="module")
def predicted(imported, run48, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred") / "pred"
    predict_nifti(run48, imported, out)
    return out


def assert_written_back(data_path: Path, predicted: Path, sources: dict[str, Path]) -> None:
    """Each patient's NIfTI prediction has its source file's grid and affine and is the
    prediction (predictions.h5, upsampled to the internal cube) resampled by nibabel onto it."""
    with open_data(data_path) as data, open_data(predicted / "predictions.h5") as preds:
        for pid in data.ids():
            source = nib.load(sources[pid])
            image = nib.load(predicted / "nifti" / f"{pid}.nii.gz")
            assert image.shape == source.shape and image.get_data_dtype() == np.float32
            np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
            internal = Geometry.from_attrs(data.patient_attrs(pid), "internal")
            assert internal is not None
            dose = data.to_source_grid(pid, preds.read_dose(pid))
            want = resample_from_to(nib.Nifti1Image(dose, internal.ras_affine()), source, order=1).get_fdata()
            got = np.asanyarray(image.dataobj)
            assert got.max() > 1  # a real dose, not zeros
            np.testing.assert_allclose(got, want, atol=0.1)


def test_predicted_nifti_is_the_prediction_on_the_source_grid_and_affine(phantoms, tree, imported, predicted):
    with open_data(predicted / "predictions.h5") as preds:
        assert preds.grid == GRID
    assert_written_back(imported, predicted, {p.id: tree[0] / p.attrs["split"] / p.id / "ct.nii.gz" for p in phantoms})


def test_evaluate_scores_the_grid_48_predictions(imported, predicted, tmp_path):
    assert nasdose("evaluate", "--pred", predicted / "predictions.h5", "--ref", imported, "--out", tmp_path / "eval",
                   "--plots", 0, "-q") == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 < metrics["dose_score"] < 70, metrics



def write_cropped(folder: Path, p: Patient) -> Path:
    """Real patient `p` cropped to its body's box (not a cube, its anisotropic voxels kept) and
    stored with its axes in another order (OpenKBP's 1, 2, 0: L, I, P), voxels unchanged; the CT's path."""
    body = np.argwhere(p.ct > 1024 - 500)
    lo, hi = body.min(axis=0), body.max(axis=0) + 1
    order = (1, 2, 0)
    full = openkbp_geometry(p.ct.shape, p.voxel_mm)
    g = Geometry(shape=tuple(int(hi[a] - lo[a]) for a in order), spacing=tuple(p.voxel_mm[a] for a in order),
                 origin=tuple(full.affine()[:3] @ [*lo, 1]), direction=tuple(full.matrix()[:, order].ravel()))
    folder.mkdir(parents=True)
    assert p.dose is not None
    arrays = {"ct": p.ct - 1024, "dose": p.dose, "possible_dose_mask": p.possible_dose_mask.astype(np.uint8),
              **{roi: m.astype(np.uint8) for roi, m in p.structures.items()}}
    for name, array in arrays.items():
        cropped = np.transpose(array[tuple(slice(a, b) for a, b in zip(lo, hi))], order)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(cropped), g.ras_affine()), folder / f"{name}.nii.gz")
    return folder / "ct.nii.gz"


def test_a_real_patient_of_another_grid_goes_through_and_back(openkbp_dir, run48, tmp_path):
    """A real OpenKBP patient as a non-cubic NIfTI in another axis order: imported at 3 mm on a
    grid of 48, predicted, written back on its own grid; its reference dose survives the trip."""
    p = read_npz_patient(openkbp_dir / "npz128" / "train" / "pt_1.npz")
    ct_path = write_cropped(tmp_path / "nifti" / "pt_1", p)
    data = tmp_path / "real48.h5"
    assert nasdose("data", "import", ct_path.parent, data, "--grid", GRID, "--spacing", 3, "-q") == 0
    predict_nifti(run48, data, tmp_path / "pred")
    assert_written_back(data, tmp_path / "pred", {"pt_1": ct_path})
    with open_data(data) as d:
        source = d.read_source("pt_1")
        back, geometry = dose_on_original(d.source_attrs("pt_1"), source.dose)
    assert source.grid == 2 * GRID and geometry.shape == nib.load(ct_path).shape
    want = np.asanyarray(nib.load(ct_path.parent / "dose.nii.gz").dataobj)
    # Where the plan's dose is smooth (under 2 Gy per voxel in a 5-voxel neighbourhood), the two
    # linear interpolations (2.5-3.9 mm voxels to 3 mm and back) lose little: on pt_1, 0.15 Gy
    # on average, 0.87 Gy at most.
    slope = np.linalg.norm(np.gradient(want), axis=0)
    smooth = (ndimage.maximum_filter(slope, size=5) < 2) & (want > 1)
    error = np.abs(back - want)[smooth]
    assert smooth.sum() > 1000 and error.mean() < 0.25 and error.max() < 1.2


def test_spacing_is_refused_for_an_openkbp_patient(openkbp_dir, tmp_path, capsys):
    patient = openkbp_dir / "npz128" / "train" / "pt_1.npz"
    assert nasdose("data", "import", patient, tmp_path / "d.h5", "--spacing", 3, "-q") == 1
    err = capsys.readouterr().err
    assert err == f"nasdose data: error: {patient}: an OpenKBP patient is not resampled to a voxel spacing (it is " \
                  "block-downsampled to the grid): import it without --spacing\n"
    assert not (tmp_path / "d.h5").exists()
