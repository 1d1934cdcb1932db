import numpy as np
import pytest
import torch

from nas_dose.data.augment import AugmentConfig
from nas_dose.data.dataset import (
    CHANNELS,
    IN_CHANNELS,
    INPUT_LAYOUT,
    DoseDataset,
    build_input,
    build_item,
    build_target,
    make_loader,
)
from nas_dose.data.patient import OARS, Patient
from nas_dose.data.store import write_dataset
from nas_dose.errors import NasDoseError

G = 16


def _patient(pid="pt_1", split="train", seed=0, dose=True, rois=("PTV56", "PTV63", "PTV70", *OARS)):
    rng = np.random.default_rng(seed)
    idx = np.indices((G, G, G))
    body = ((idx - 7.5) ** 2).sum(0) <= 49
    mask = ((idx - 7.5) ** 2).sum(0) <= 30
    structures = {}
    for name in rois:
        c = rng.integers(4, 12, 3)
        structures[name] = ((idx - c[:, None, None, None]) ** 2).sum(0) <= 6
    return Patient(
        id=pid,
        ct=np.where(body, rng.uniform(900, 1400, (G, G, G)), 0).astype(np.float32),
        possible_dose_mask=mask,
        structures=structures,
        voxel_mm=(4.0, 4.0, 2.5),
        dose=(rng.uniform(0, 75, (G, G, G)) * mask).astype(np.float32) if dose else None,
        attrs={"split": split},
    )


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.h5"
    patients = [_patient(f"pt_{i}", "train" if i < 6 else "validation", seed=i) for i in range(8)]
    write_dataset(path, patients, source="test", grid=G)
    return path


def test_channels():
    assert CHANNELS[:2] == ("ct", "ptv") and CHANNELS[-1] == "possible_dose_mask"
    assert CHANNELS[2:-1] == OARS and IN_CHANNELS == len(CHANNELS) == 10
    (right, left), = INPUT_LAYOUT.mirror_pairs
    assert (CHANNELS[right], CHANNELS[left]) == ("RightParotid", "LeftParotid")


def test_build_input_values():
    p = _patient(rois=("PTV56", "PTV63", "Mandible"))
    p.ct[0, 0, :4] = [0, 1024, 3024, 4095]  # -1024 HU (air), 0 HU, 2000 HU, 3071 HU
    p.structures["PTV56"][:] = False
    p.structures["PTV63"][:] = False
    p.structures["PTV56"][2:6] = True
    p.structures["PTV63"][4:8] = True  # overlaps PTV56 in slices 4-5: the higher level wins
    x = build_input(p)
    assert x.dtype == np.float32 and x.shape == (IN_CHANNELS, G, G, G)
    np.testing.assert_allclose(x[0, 0, 0, :4], [-1.024, 0.0, 1.5, 1.5])
    np.testing.assert_allclose(x[1, 2:4], 0.8)
    np.testing.assert_allclose(x[1, 4:8], 0.9)
    assert np.all(x[1, 8:] == 0) and np.all(x[1, :2] == 0)
    np.testing.assert_array_equal(x[CHANNELS.index("Mandible")], p.structures["Mandible"])
    assert not x[CHANNELS.index("Brainstem")].any()  # not contoured: zeros
    np.testing.assert_array_equal(x[-1], p.possible_dose_mask)


def test_ptv70_is_1_and_wins_everywhere():
    p = _patient()
    for name in ("PTV56", "PTV63", "PTV70"):
        p.structures[name][:] = True
    assert np.all(build_input(p)[1] == 1.0)


def test_build_target_and_errors():
    p = _patient()
    np.testing.assert_allclose(build_target(p)[0], p.dose / 70.0, rtol=1e-6)
    assert build_target(p).shape == (1, G, G, G) and build_target(p).dtype == np.float32
    with pytest.raises(NasDoseError, match="patient pt_9: no reference dose"):
        build_target(_patient("pt_9", dose=False))
    bad = _patient()
    bad.structures["PTV70"] = bad.structures["PTV70"][:-1]
    with pytest.raises(NasDoseError, match="patient pt_1: 'PTV70' has shape"):
        build_input(bad)


def test_augmented_dose_stays_zero_outside_the_mask():
    p = _patient()
    for seed in range(5):
        item = build_item(p, AugmentConfig(probability=1.0), np.random.default_rng(seed))
        assert np.all(item["target"][item["mask"] == 0] == 0)
        assert item["target"].max() > 0.5
        np.testing.assert_array_equal(item["mask"], item["input"][-1:])


def test_dataset_items(data_file):
    ds = DoseDataset(data_file, "train")
    assert len(ds) == 6 and ds.grid == G
    item = ds[2]
    assert item["id"] == "pt_2"
    assert item["input"].dtype == torch.float32 and item["input"].shape == (IN_CHANNELS, G, G, G)
    p = _patient("pt_2", seed=2)
    np.testing.assert_allclose(item["input"].numpy(), build_input(p))
    np.testing.assert_allclose(item["target"].numpy(), build_target(p), rtol=1e-6)
    np.testing.assert_array_equal(item["mask"].numpy()[0], p.possible_dose_mask)
    assert item["labeled"].item() == 1.0
    assert [it["id"] for it in DoseDataset(data_file, "validation")] == ["pt_6", "pt_7"]
    assert len(DoseDataset(data_file, None)) == 8
    # several splits, one after the other
    assert DoseDataset(data_file, ["validation", "train"]).ids == ["pt_6", "pt_7"] + [f"pt_{i}" for i in range(6)]


def test_an_unlabeled_item_has_a_zero_target_and_says_so():
    p = _patient()
    item = build_item(_patient("pt_9", dose=False), labeled=False)
    assert item["labeled"] == 0.0 and item["target"].shape == (1, G, G, G) and not item["target"].any()
    np.testing.assert_array_equal(item["input"], build_input(p))
    assert build_item(p)["labeled"] == 1.0


def test_training_on_a_patient_without_a_dose_names_it(unlabeled_data):
    ds = DoseDataset(unlabeled_data, "unlabeled")
    assert len(ds) == 4
    with pytest.raises(NasDoseError, match="patient pt_9: no reference dose"):
        ds[0]


def test_empty_split_is_an_error(data_file):
    with pytest.raises(NasDoseError, match=r"d\.h5: no patients in split 'test'"):
        DoseDataset(data_file, "test")
    with pytest.raises(NasDoseError, match=r"d\.h5: no patients in split 'test', 'unlabeled'"):
        DoseDataset(data_file, ["test", "unlabeled"])


def test_augmentation_depends_on_seed_epoch_and_index_only(data_file):
    cfg = AugmentConfig(probability=1.0)
    ds = DoseDataset(data_file, "train", cfg, seed=3)
    first = ds[1]["input"]
    ds.set_epoch(1)
    second = ds[1]["input"]
    assert not torch.equal(first, second)
    other = DoseDataset(data_file, "train", cfg, seed=3)
    other.set_epoch(1)
    assert torch.equal(other[1]["input"], second)  # a fresh dataset resumes exactly
    assert torch.equal(other[(1, 0)]["input"], first)  # (index, epoch) keys override the epoch
    assert not torch.equal(DoseDataset(data_file, "train", cfg, seed=4)[(1, 0)]["input"], first)
    plain = DoseDataset(data_file, "train", AugmentConfig(enabled=False))
    assert torch.equal(plain[1]["input"], torch.from_numpy(build_input(_patient("pt_1", seed=1))))


def _epoch_batches(loader, epoch):
    loader.dataset.set_epoch(epoch)
    return [(b["id"], b["input"]) for b in loader]


def test_loader_order_and_batches_are_reproducible_and_resumable(data_file):
    cfg = AugmentConfig(probability=1.0)
    loader = make_loader(DoseDataset(data_file, "train", cfg), batch_size=2, shuffle=True, seed=5)
    run = [_epoch_batches(loader, e) for e in range(3)]
    orders = [[pid for ids, _ in epoch for pid in ids] for epoch in run]
    assert all(sorted(o) == [f"pt_{i}" for i in range(6)] for o in orders)
    assert len({tuple(o) for o in orders}) == 3  # a new order each epoch
    resumed = make_loader(DoseDataset(data_file, "train", cfg), batch_size=2, shuffle=True, seed=5)
    for (ids_a, x_a), (ids_b, x_b) in zip(run[2], _epoch_batches(resumed, 2)):
        assert ids_a == ids_b and torch.equal(x_a, x_b)
    other_seed = make_loader(DoseDataset(data_file, "train"), batch_size=2, shuffle=True, seed=6)
    assert [i for ids, _ in _epoch_batches(other_seed, 2) for i in ids] != orders[2]
    fixed = make_loader(DoseDataset(data_file, "train"), batch_size=4, shuffle=False, drop_last=True)
    assert [b["id"] for b in fixed] == [["pt_0", "pt_1", "pt_2", "pt_3"]]


def test_persistent_workers_see_each_epoch(data_file):
    cfg = AugmentConfig(probability=1.0)
    serial = make_loader(DoseDataset(data_file, "train", cfg), batch_size=3, shuffle=True, seed=1)
    workers = make_loader(DoseDataset(data_file, "train", cfg), batch_size=3, shuffle=True, seed=1,
                          num_workers=2)
    for epoch in (0, 1):
        for (ids_a, x_a), (ids_b, x_b) in zip(_epoch_batches(serial, epoch), _epoch_batches(workers, epoch)):
            assert ids_a == ids_b and torch.equal(x_a, x_b)


class _GlobalRandom(torch.utils.data.Dataset):
    """Items drawn from numpy's global generator, to see each worker's seed."""

    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 4

    def __getitem__(self, key):
        return torch.tensor([torch.utils.data.get_worker_info().id, np.random.randint(2**31)])


def test_workers_get_distinct_seeds():
    loader = make_loader(_GlobalRandom(), batch_size=1, shuffle=False, num_workers=2, seed=0)
    (worker_a, draw_a), (worker_b, draw_b) = torch.cat(list(loader))[:2].tolist()  # first draw of each
    assert worker_a != worker_b and draw_a != draw_b


def test_loader_arguments_are_checked(data_file):
    with pytest.raises(NasDoseError, match="batch size"):
        make_loader(DoseDataset(data_file, "train"), batch_size=0, shuffle=False)
    with pytest.raises(TypeError, match="set_epoch"):
        make_loader(torch.utils.data.TensorDataset(torch.zeros(2)), batch_size=1, shuffle=False)
