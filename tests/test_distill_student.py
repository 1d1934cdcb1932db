"""Student specs: registered models with arguments, YAML model sections, scaled genotypes."""
import pytest

from nas_dose.errors import NasDoseError
from nas_dose.io import save_yaml
from nas_dose.models.factory import ModelConfig, build_model
from nas_dose.models.spec import GENOTYPE_FILE, resolve_student, scale_genotype
from nas_dose.search_spaces import count_params, get_space, load_genotype, save_genotype

CHOICES = {"down.op1": "conv", "down.op2": "identity", "down.connect": "identity", "down.down": "max_pool",
           "up.op1": "conv", "up.op2": "identity", "up.connect": "identity", "up.up": "up_interpolate"}


@pytest.fixture
def genotype_file(tmp_path):
    path = tmp_path / "g.yaml"
    save_genotype(path, get_space("lenas").genotype(CHOICES, {"stem": 8, "widths": [16, 32]}))
    return path


def test_registered_model_with_arguments(tmp_path):
    assert resolve_student("unet3d:widths=4,8,16", tmp_path) == ModelConfig("unet3d", {"widths": [4, 8, 16]})
    assert resolve_student("unet3d:widths=4,8:norm=batch:dropout=0.1", tmp_path) == ModelConfig(
        "unet3d", {"widths": [4, 8], "norm": "batch", "dropout": 0.1})
    assert resolve_student("unet3d", tmp_path) == ModelConfig("unet3d", {})
    assert not (tmp_path / GENOTYPE_FILE).exists()


def test_yaml_model_section(tmp_path, genotype_file):
    spec = tmp_path / "student.yaml"
    save_yaml(spec, {"model": {"name": "unet3d", "kwargs": {"widths": [4, 8]}}})
    assert resolve_student(str(spec), tmp_path / "run") == ModelConfig("unet3d", {"widths": [4, 8]})
    save_yaml(spec, {"model": {"name": "lenas", "genotype": str(genotype_file)}})
    model = resolve_student(str(spec), tmp_path / "run")
    assert model.genotype == str(tmp_path / "run" / GENOTYPE_FILE)
    assert load_genotype(model.genotype) == load_genotype(genotype_file)


def test_genotype_with_a_width_multiplier(tmp_path, genotype_file):
    full = resolve_student(str(genotype_file), tmp_path / "full")
    half = resolve_student(f"{genotype_file}:width=0.5", tmp_path / "half")
    g = load_genotype(half.genotype)
    assert g.macro["stem"] == 4 and g.macro["widths"] == [8, 16] and g.choices == CHOICES
    assert half.name == "lenas" and half.genotype == str(tmp_path / "half" / GENOTYPE_FILE)
    # convolutions' parameters scale with the square of the width: about a quarter
    ratio = count_params(build_model(half)) / count_params(build_model(full))
    assert 0.2 < ratio < 0.3
    assert scale_genotype(g, 0.01).macro == {**g.macro, "stem": 1, "widths": [1, 1]}


@pytest.mark.parametrize("spec, message", [
    ("nomodel:widths=4", "unknown model 'nomodel'"),
    ("unet3d:depth=3", "depth"),
    ("unet3d:widths=4:widths=8", "repeated key"),
    ("unet3d:widths=4:extra", "follows the options"),
    (":widths=4", "no model name"),
    ("{tmp}/absent.yaml:width=0.5", "absent.yaml: file not found"),
    ("{genotype}:width=-1", "width must be a positive number"),
    ("{genotype}:depth=2", "unknown option 'depth'"),
])
def test_bad_specs_name_the_spec_or_file(tmp_path, genotype_file, spec, message):
    spec = spec.format(tmp=tmp_path, genotype=genotype_file)
    with pytest.raises(NasDoseError, match="--student") as info:
        resolve_student(spec, tmp_path / "run")
    assert message in str(info.value) and "\n" not in str(info.value)
