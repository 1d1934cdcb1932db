import io
import random

import numpy as np
import pytest
import torch
from torch import nn

from nas_dose.config import ConfigError, load_config
from nas_dose.errors import NasDoseError
from nas_dose.runtime import (
    Runtime,
    RuntimeConfig,
    default_loader_workers,
    rng_state,
    seed_everything,
    set_rng_state,
)


@pytest.fixture(autouse=True)
def _restore_global_torch_settings():
    """A Runtime sets process-wide flags; put them back so other tests see the defaults."""
    threads = torch.get_num_threads()
    yield
    Runtime(RuntimeConfig(device="cpu", threads=threads))


def test_cpu_choices_and_description():
    rt = Runtime(RuntimeConfig(device="auto", amp="auto", threads=1))
    assert rt.device == torch.device("cpu")
    assert rt.amp == "off" and rt.amp_dtype is None
    assert not rt.grad_scaler().is_enabled()
    d = rt.describe()
    assert d["device"] == "cpu" and d["amp"] == "off" and d["threads"] == 1
    assert d["torch"] == torch.__version__
    assert d["cudnn_benchmark"] is False  # no cuDNN on a CPU, whatever was asked
    assert d["deterministic"] is False


def test_explicit_amp_is_off_on_cpu():
    assert Runtime(RuntimeConfig(device="cpu", amp="bf16")).describe()["amp"] == "off"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_user_error(device):
    with pytest.raises(NasDoseError, match="CUDA is not available"):
        Runtime(RuntimeConfig(device=device))


@pytest.mark.parametrize("device", ["tpu9", "gpu", "mps"])
def test_unknown_device_is_a_user_error(device):
    with pytest.raises(NasDoseError, match="runtime.device"):
        Runtime(RuntimeConfig(device=device))


def test_bad_threads_names_the_key():
    with pytest.raises(ConfigError, match="runtime.threads"):
        load_config(RuntimeConfig, overrides=["threads=0"])


def test_deterministic_mode_sets_the_flags():
    rt = Runtime(RuntimeConfig(device="cpu", deterministic=True))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert rt.describe()["deterministic"] is True
    Runtime(RuntimeConfig(device="cpu"))
    assert not torch.are_deterministic_algorithms_enabled()


def test_prepare_and_to_device_with_channels_last():
    rt = Runtime(RuntimeConfig(device="cpu", channels_last=True))
    model = rt.prepare(nn.Conv3d(2, 3, 3, padding=1))
    batch = rt.to_device({"input": torch.rand(1, 2, 4, 4, 4), "id": ["a"], "mask": [torch.ones(2)]})
    assert batch["input"].is_contiguous(memory_format=torch.channels_last_3d)
    assert batch["id"] == ["a"] and torch.equal(batch["mask"][0], torch.ones(2))
    assert model.weight.is_contiguous(memory_format=torch.channels_last_3d)
    plain = nn.Conv3d(2, 3, 3, padding=1)
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(model(batch["input"]), plain(batch["input"].contiguous()), atol=1e-6)


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seeding_repeats_every_generator():
    seed_everything(7)
    first = _draws()
    seed_everything(7)
    assert _draws() == first
    seed_everything(8)
    assert _draws() != first


def test_rng_state_round_trips_through_a_weights_only_checkpoint():
    seed_everything(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = _draws()
    _draws()
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert _draws() == expected


def test_cpu_peak_memory_is_the_process_peak_rss():
    rt = Runtime(RuntimeConfig(device="cpu"))
    rt.reset_peak_memory()  # nothing to reset on a CPU, and no error
    before = rt.peak_memory()
    assert before["kind"] == "process_max_rss" and before["bytes"] > 0
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB touched: the peak cannot go down
    assert rt.peak_memory()["bytes"] >= before["bytes"] and block.sum() == 64 * 2**20


def test_free_memory_on_cpu_is_positive_or_unknown():
    free = Runtime(RuntimeConfig(device="cpu")).free_memory()
    assert free is None or free > 0


def test_loader_workers_auto_is_0_on_cpu_and_an_explicit_number_is_kept():
    rt = Runtime(RuntimeConfig(device="cpu"))
    assert rt.loader_workers(None) == 0
    assert rt.loader_workers(3) == 3


def test_loader_workers_with_cuda_take_all_but_two_cores_at_most_12():
    # a 128³ patient costs a core far longer than a GPU step: 4 workers left an H200 waiting
    assert [default_loader_workers("cuda", n) for n in (1, 2, 4, 16, 64)] == [1, 1, 2, 12, 12]
    assert default_loader_workers("cpu", 64) == 0


def test_loader_workers_with_cuda_share_the_cores_with_the_nodes_other_ranks(monkeypatch):
    # default_loader_workers of cores // LOCAL_WORLD_SIZE: 8 ranks on 64 cores take 6 workers each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    rt = Runtime(RuntimeConfig(device="cpu"))
    monkeypatch.setattr(rt, "device", torch.device("cuda"))
    assert rt.loader_workers(None) == 6 and rt.loader_workers(3) == 3
