import pytest
import torch
from torch import nn

from nas_dose.errors import NasDoseError
from nas_dose.models import create_model, list_models, register_model, registry, small_kwargs

MODELS = list_models()
EVEN, ODD = (16, 16, 16), (13, 17, 15)


def _input(n, shape, seed=0):
    """Random channels; the last one a binary possible-dose mask, mostly ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, *shape, generator=g)
    x[:, -1:] = (torch.rand(n, 1, *shape, generator=g) > 0.2).float()
    return x


def _small(name, seed=0):
    torch.manual_seed(seed)
    return create_model(name, **small_kwargs(name))


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_reference_models_are_registered():
    assert {"unet3d", "unet2d"} <= set(MODELS) and MODELS == sorted(MODELS)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [EVEN, ODD])
def test_output_has_the_input_size(name, shape):
    y = _small(name)(_input(2, shape))
    assert y.shape == (2, 1, *shape) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name):
    model = _small(name)
    x = _input(2, EVEN)
    (model(x) - 0.5 * x[:, -1:]).abs().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", MODELS)
def test_optimizer_steps_reduce_the_loss(name):
    model = _small(name)
    x = _input(2, (8, 8, 8))
    target = 0.5 * x[:, -1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss():
        torch.manual_seed(1)  # the same dropout draws every time
        return (model(x) - target).abs().mean()

    start = loss().item()
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.5 * start


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_matches_eager(name):
    model = _small(name).eval()
    x = _input(1, ODD)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_batch_items_are_independent_in_eval_mode(name):
    model = _small(name).eval()
    x = _input(2, EVEN)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:], model(x[1:]))


# Hand counts for widths (4, 8), 10 input channels, 1 output channel. A 3^d conv in->out
# without bias (a norm follows) has in*out*3^d weights; each norm has 2*channels.
#   3D: level 0: 10*4*27 + 8 + 4*4*27 + 8 = 1528;  level 1: 4*8*27 + 16 + 8*8*27 + 16 = 2624;
#       up 8->4 (2x2x2, bias): 8*4*8 + 4 = 260;  decoder 8->4: 8*4*27 + 8 + 4*4*27 + 8 = 1312;
#       head 4->1 (1x1x1, bias): 5.  Total 5729. A strided-conv down 4->4 (2x2x2, bias) adds 132.
#   2D: level 0: 10*4*9 + 8 + 4*4*9 + 8 = 520;  level 1: 4*8*9 + 16 + 8*8*9 + 16 = 896;
#       up: 8*4*4 + 4 = 132;  decoder: 8*4*9 + 8 + 4*4*9 + 8 = 448;  head: 5.  Total 2001.
@pytest.mark.parametrize("name, kwargs, count", [
    ("unet3d", {}, 5729),
    ("unet3d", {"norm": "batch", "act": "leaky_relu", "dropout": 0.2}, 5729),
    ("unet3d", {"down": "conv"}, 5729 + 132),
    ("unet2d", {}, 2001),
])
def test_parameter_counts_match_a_hand_count(name, kwargs, count):
    assert _n_params(create_model(name, widths=(4, 8), **kwargs)) == count


@pytest.mark.parametrize("kwargs", [{"norm": "batch"}, {"act": "leaky_relu"}, {"down": "conv"},
                                    {"dropout": 0.3}])
def test_unet3d_variants_differ_from_the_default(kwargs):
    x = _input(2, EVEN)  # batch norm differs from instance norm only for batches of several
    base = _small("unet3d")
    torch.manual_seed(0)
    variant = create_model("unet3d", widths=(4, 8, 16), **kwargs)
    assert not torch.allclose(base(x), variant(x))


def test_unet3d_default_layout():
    model = create_model("unet3d")
    assert [e[0][0].out_channels for e in model.encoders] == [16, 32, 64, 128, 256]
    assert isinstance(model.downs[0], nn.MaxPool3d) and isinstance(model.ups[0], nn.ConvTranspose3d)
    assert model.encoders[0][0][0].in_channels == 10 and model.head.out_channels == 1


@pytest.mark.parametrize("shape", [EVEN, ODD])
def test_unet2d_output_is_zero_outside_the_mask(shape):
    model = _small("unet2d")
    x = _input(2, shape)
    y = model(x)
    assert torch.all(y[x[:, -1:] == 0] == 0) and y[x[:, -1:] == 1].abs().min() > 0


def test_unet2d_works_slice_by_slice_along_axis_2():
    model = _small("unet2d").eval()
    x = _input(1, EVEN)
    changed = x.clone()
    changed[:, :-1, :, :, 5] += 1.0
    with torch.no_grad():
        diff = (model(changed) - model(x)).abs().amax(dim=(0, 1, 2, 3))
    assert diff[5] > 0 and torch.all(diff[torch.arange(16) != 5] == 0)


def test_unet2d_uses_batchnorm_maxpool_and_dropout():
    layers = list(create_model("unet2d").modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in layers)
    assert any(isinstance(m, nn.MaxPool2d) for m in layers)
    assert {m.p for m in layers if isinstance(m, nn.Dropout)} == {0.1}
    assert not any(isinstance(m, (nn.Conv3d, nn.InstanceNorm2d)) for m in layers)


@pytest.mark.parametrize("name, kwargs, message", [
    ("unet4d", {}, r"unknown model 'unet4d' \(known: .*unet2d, unet3d"),
    ("unet3d", {"widht": (4, 8)}, r"model 'unet3d': unknown argument 'widht' \(arguments: in_channels"),
    ("unet3d", {"norm": "group"}, r"model 'unet3d': argument 'norm': expected one of 'instance', 'batch'"),
    ("unet3d", {"act": "gelu"}, "argument 'act'"),
    ("unet3d", {"down": "avg_pool"}, "argument 'down'"),
    ("unet3d", {"widths": (8,)}, "argument 'widths'"),
    ("unet2d", {"widths": (8, 0)}, "argument 'widths'"),
    ("unet2d", {"dropout": 1.0}, "argument 'dropout'"),
    ("unet3d", {"in_channels": 0}, "argument 'in_channels'"),
    ("no_such_module_xyz:Net", {}, "cannot import module 'no_such_module_xyz'"),
    ("torch.nn:NoSuchNet", {}, "module 'torch.nn' has no attribute 'NoSuchNet'"),
    ("torch.nn:Conv3d", {"in_channels": 10, "out_channels": 1}, "missing a required argument: 'kernel_size'"),
    ("math:pi", {}, "'pi' is not a class or function"),
    ("collections:OrderedDict", {}, "returned OrderedDict, not a torch.nn.Module"),
])
def test_bad_names_and_arguments_are_errors(name, kwargs, message):
    with pytest.raises(NasDoseError, match=message):
        create_model(name, **kwargs)


def test_models_import_from_outside_the_package():
    model = create_model("torch.nn:Conv3d", in_channels=10, out_channels=1, kernel_size=1)
    assert isinstance(model, nn.Conv3d) and model.in_channels == 10


def test_register_a_factory(monkeypatch):
    monkeypatch.setattr(registry.MODELS, "_entries", dict(registry.MODELS._entries))

    @register_model("linear_dose", small={"hidden": 2})
    def linear_dose(in_channels: int = 10, hidden: int = 8) -> nn.Module:
        return nn.Sequential(nn.Conv3d(in_channels, hidden, 1), nn.Conv3d(hidden, 1, 1))

    assert "linear_dose" in list_models() and small_kwargs("linear_dose") == {"hidden": 2}
    assert _n_params(create_model("linear_dose", hidden=3)) == 10 * 3 + 3 + 3 + 1
    register_model("linear_dose", small={"hidden": 2})(linear_dose)  # the same registration again: harmless
    with pytest.raises(NasDoseError, match="model 'linear_dose': already registered by .*linear_dose"):
        register_model("linear_dose")(lambda: nn.Identity())
    with pytest.raises(NasDoseError, match="not a class or function"):
        register_model("broken")(42)


@pytest.mark.parametrize("shape", [(16, 16, 16), (32, 32, 16)])
def test_unet3d_too_deep_for_its_input_is_a_clear_error(shape):
    """Five levels halve 16 voxels down to 1, where instance norm has nothing to normalize."""
    with pytest.raises(NasDoseError, match=r"too small for 5 levels"):
        create_model("unet3d")(_input(1, shape))
    assert create_model("unet3d", widths=(4, 8, 16, 32))(_input(1, shape)).shape == (1, 1, *shape)
