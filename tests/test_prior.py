"""The stage-I dose prior: the latent model and its autoencoder, the decoder hand-over (through
FiLM layers too), the latent term, `nasdose train` with `prior.*`, and its refusals."""
from dataclasses import replace

import pytest
import torch

import nas_dose.training.prior as prior_module
from nas_dose.config import ConfigError, load_config, to_dict
from nas_dose.data.dataset import DoseDataset
from nas_dose.distill.distill import DistillConfig
from nas_dose.ensemble import EnsembleConfig
from nas_dose.errors import NasDoseError
from nas_dose.io import load_checkpoint, load_json
from nas_dose.models import create_model, list_models, prior_of, small_kwargs
from nas_dose.models.conditioning import Conditioned, condition, conditioning_spec
from nas_dose.models.factory import load_model
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.train import Inputs, interrupted
from nas_dose.train import run as train
from nas_dose.training import TrainConfig
from nas_dose.training.checkpoints import check_resumable
from nas_dose.training.prior import DoseAsInput, LatentTerm, load_decoder, prior_config

SMALL = ["model.name=latent_dose_net", "model.kwargs={widths: [4, 8], latent: 4}", "epochs=2",
         "runtime.device=cpu", "runtime.threads=1", "data.augment.enabled=false"]


def _autoencoder(seed=1):
    torch.manual_seed(seed)
    return create_model("dose_autoencoder", **small_kwargs("dose_autoencoder"))


def _latent_net(conditioned, seed=2):
    torch.manual_seed(seed)
    net = create_model("latent_dose_net", **small_kwargs("latent_dose_net"))
    return condition(net, conditioning_spec("film", ["oar", "hi"])) if conditioned else net


def test_the_autoencoder_is_a_prior_not_a_dose_predictor():
    assert "latent_dose_net" in list_models() and "dose_autoencoder" not in list_models()
    assert list_models("dose") == ["dose_autoencoder"]
    assert prior_of("latent_dose_net") == "dose_autoencoder" and prior_of("unet3d") is None
    y = _autoencoder()(torch.rand(2, 1, 13, 16, 9))
    assert y.shape == (2, 1, 13, 16, 9)


def test_the_decoder_reads_only_the_latent():
    """What makes the prior's decoder reusable: the output depends on the input only through the
    encoder's latent (no skips)."""
    net = _latent_net(False).eval()
    x = torch.rand(1, 10, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), net.decoder(net.encoder(x)))


@pytest.mark.parametrize("conditioned", [False, True])
@pytest.mark.parametrize("freeze", [False, True])
def test_the_model_decoder_starts_from_the_autoencoders(conditioned, freeze):
    ae, model = _autoencoder(), _latent_net(conditioned)
    film_before = {k: v.clone() for k, v in model.state_dict().items() if ".film." in k}
    load_decoder(model, ae.state_dict(), freeze)
    plain = model.net if isinstance(model, Conditioned) else model
    got = {k.replace(".norm.", "."): v for k, v in plain.decoder.state_dict().items() if ".film." not in k}
    want = ae.decoder.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in film_before.items())  # heads untouched
    trainable = {n for n, p in plain.decoder.named_parameters() if p.requires_grad}
    films = {n for n, _ in plain.decoder.named_parameters() if ".film." in n}
    assert trainable == (films if freeze else {n for n, _ in plain.decoder.named_parameters()})
    assert all(p.requires_grad for p in plain.encoder.parameters())
    if conditioned:  # its fresh FiLM heads are zero: it computes what the plain one given the prior does
        twin = _latent_net(False)
        load_decoder(twin, ae.state_dict(), freeze)
        x, prefs = torch.rand(1, 10, 16, 16, 16), torch.tensor([[0.3, 0.1]])
        with torch.no_grad():
            assert torch.allclose(model.eval()(x, prefs), twin.eval()(x), atol=1e-6)


def test_a_decoder_of_another_size_is_refused():
    ae = create_model("dose_autoencoder", widths=(4, 8), latent=2)
    with pytest.raises(ConfigError, match="does not fit"):
        load_decoder(_latent_net(False), ae.state_dict(), False)


def test_stage_one_items_take_their_own_dose_as_input(plan_data):
    items = DoseAsInput(DoseDataset(plan_data, "train"))
    item = items[0]
    assert items.in_channels == 1 and item["input"].shape == (1, 16, 16, 16)
    assert torch.equal(item["input"], item["target"]) and item["target"].abs().sum() > 0
    items.set_epoch(3)
    assert items.epoch == 3 and items.grid == 16 and len(items) == len(DoseDataset(plan_data, "train"))


def test_the_latent_term_compares_the_latents_of_a_padded_odd_sized_dose():
    """L1 between the model's latent and the autoencoder's latent of the target, the target padded
    as the model pads its input (two levels: 13 voxels padded to 14, a latent of 7)."""
    ae, model = _autoencoder(), _latent_net(False)
    term = LatentTerm(ae.encoder, weight=2.0)
    term.bind(model, Runtime(RuntimeConfig(device="cpu")), load_config(TrainConfig))
    x, target = torch.rand(2, 10, 13, 13, 13), torch.rand(2, 1, 13, 13, 13)
    mask = torch.ones_like(target)
    pred = model(x)
    latent = model.encoder(torch.nn.functional.pad(x, [0, 1] * 3))
    want = (latent - ae.encoder(torch.nn.functional.pad(target, [0, 1] * 3))).abs().mean()
    loss = term.loss(pred, {"target": target, "mask": mask, "input": x})
    base = (pred - target).abs().sum() / mask.sum()
    assert loss.item() == pytest.approx(base.item() + 2.0 * want.item(), rel=1e-4)
    assert term.log_terms() == {"latent": pytest.approx(want.item(), rel=1e-4)} and term.log_terms() == {}


def test_train_with_a_frozen_prior_and_the_latent_term_then_resume(plan_data, tmp_path, capsys):
    """Stage I trains the autoencoder on the plans into RUN/prior; the frozen decoder of the
    trained model is the prior's; the latent term is logged; --resume reuses both finished runs."""
    cfg = load_config(TrainConfig, overrides=[*SMALL, "model.conditioning=film", "data.plans=true",
                                              "prior.epochs=2", "prior.freeze=true", "prior.latent_weight=0.5"])
    out = tmp_path / "run"
    train(cfg, Inputs(plan_data), out, official=False)
    prior, model = load_checkpoint(out / "prior" / "best.pt"), load_checkpoint(out / "best.pt")
    assert prior["model_config"]["name"] == "dose_autoencoder" and "in_channels" not in prior["model_config"]["kwargs"]
    assert load_json(out / "prior" / "metrics.json")["steps"] == 2 * 3  # 6 training patients, batch 2
    decoder = {k.removeprefix("net.decoder.").replace(".norm.", "."): v for k, v in model["model"].items()
               if k.startswith("net.decoder.") and ".film." not in k}
    want = {k.removeprefix("decoder."): v for k, v in prior["model"].items() if k.startswith("decoder.")}
    assert decoder.keys() == want.keys() and all(torch.equal(decoder[k], want[k]) for k in want)
    films = [v for k, v in model["model"].items() if k.startswith("net.decoder.") and ".film." in k]
    assert any(v.abs().sum() > 0 for v in films)  # the FiLM heads of the frozen decoder did learn
    log = (out / "log.jsonl").read_text()
    assert '"latent": ' in log
    assert "dose prior (stage I): dose_autoencoder, 2 epochs" in capsys.readouterr().out
    again = train(cfg, Inputs(plan_data), out, resume=True, official=False)
    assert again.steps == load_json(out / "metrics.json")["steps"]
    assert torch.equal(load_checkpoint(out / "best.pt")["model"]["net.decoder.0.0.weight"],
                       model["model"]["net.decoder.0.0.weight"])


def test_a_prior_changes_the_trained_model(data, tmp_path):
    """Unfrozen, the decoder starts from the prior and trains on: a different model than from
    scratch with the same seed, and the same one again for the same settings."""
    runs = {}
    for name, extra in (("scratch", []), ("prior", ["prior.epochs=1"]), ("prior_again", ["prior.epochs=1"])):
        cfg = load_config(TrainConfig, overrides=[*SMALL, *extra])
        train(cfg, Inputs(data), tmp_path / name, official=False)
        runs[name] = load_checkpoint(tmp_path / name / "best.pt")["model"]["decoder.0.0.weight"]
    assert not torch.equal(runs["scratch"], runs["prior"]) and torch.equal(runs["prior"], runs["prior_again"])


@pytest.mark.parametrize("overrides, message", [
    (["prior.epochs=1"], "model 'unet3d' has no dose prior"),
    (["prior.freeze=true"], "need a dose prior"),
    (["prior.latent_weight=-1", "prior.epochs=1"], "must be >= 0"),
])
def test_a_prior_the_model_cannot_have_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        prior_config(load_config(TrainConfig, overrides=overrides))


def test_stages_that_do_not_run_a_prior_refuse_one():
    with pytest.raises(ConfigError, match="train.prior.epochs"):
        load_config(EnsembleConfig, overrides=["train.prior.epochs=1"])
    with pytest.raises(ConfigError, match="train.prior.epochs"):
        load_config(DistillConfig, overrides=["train.prior.epochs=1"])
    with pytest.raises(ConfigError, match="cascade's full-resolution stage has no dose prior"):
        load_config(TrainConfig, overrides=["prior.epochs=1", "cascade.coarse=/nowhere"])


def test_a_checkpoint_older_than_the_prior_key_still_resumes(tmp_path):
    cfg = load_config(TrainConfig)
    old = {k: v for k, v in to_dict(cfg).items() if k != "prior"}
    check_resumable({"format": "nasdose-checkpoint", "optimizer": {}, "config": old}, cfg, tmp_path / "last.pt")
    with pytest.raises(Exception, match="different config"):
        check_resumable({"format": "nasdose-checkpoint", "optimizer": {}, "config": old},
                        replace(cfg, prior=replace(cfg.prior, epochs=1)), tmp_path / "last.pt")


def test_the_prior_run_is_not_taken_for_a_dose_model(data, tmp_path):
    cfg = load_config(TrainConfig, overrides=[*SMALL, "epochs=1", "prior.epochs=1"])
    train(cfg, Inputs(data), tmp_path / "run", official=False)
    with pytest.raises(NasDoseError, match=r"prior/best.pt: is a dose prior's autoencoder"):
        load_model(tmp_path / "run" / "prior")
    assert isinstance(load_model(tmp_path / "run")[0], torch.nn.Module)


def test_a_run_stopped_in_stage_one_resumes_there(data, tmp_path, cut_training):
    """Killed during the prior, the run is `interrupted` (what the pipeline resumes by), and
    --resume finishes stage I from its checkpoint, then trains the model: the same prior as an
    uninterrupted run's."""
    cfg = load_config(TrainConfig, overrides=[*SMALL, "epochs=1", "prior.epochs=2", "checkpoint_every=1"])
    train(cfg, Inputs(data), tmp_path / "whole", official=False)
    cut_training(prior_module, 4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, Inputs(data), tmp_path / "cut", official=False)
    assert interrupted(tmp_path / "cut") and not (tmp_path / "cut" / "best.pt").exists()
    cut_training(prior_module, None)
    train(cfg, Inputs(data), tmp_path / "cut", resume=interrupted(tmp_path / "cut"), official=False)
    whole, cut = (load_checkpoint(tmp_path / r / "prior" / "best.pt")["model"] for r in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert (tmp_path / "cut" / "best.pt").exists()
    assert load_json(tmp_path / "cut" / "prior" / "metrics.json")["steps"] == 6
