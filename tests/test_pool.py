import numpy as np
import pytest
import yaml

from nas_dose.errors import NasDoseError
from nas_dose.pool import Pool, PoolMember, load_pool, save_pool
from nas_dose.search_spaces import get_space


def make_pool() -> Pool:
    space = get_space("lenas")
    rng = np.random.RandomState(0)
    g0, g1 = space.sample(rng, {"stem": 4, "widths": [8, 16]}), space.sample(rng, {"stem": 4, "widths": [8, 16]})
    matrices = {"disagreement": np.array([[0.0, 0.25], [0.25, 0.0]]),
                "error_correlation": np.array([[1.0, np.nan], [np.nan, 1.0]]),
                "genotype_distance": np.array([[0.0, space.distance(g0, g1)], [space.distance(g0, g1), 0.0]])}
    members = [PoolMember("m0", g0, 3.21, {"params": 1000.0}), PoolMember("m1", g1, 3.5, {})]
    return Pool("lenas", "differentiable", 0, members, matrices, "test predictions", {"pool_size": 2})


def test_round_trip(tmp_path):
    pool = make_pool()
    save_pool(tmp_path / "pool.yaml", pool)
    raw = yaml.safe_load((tmp_path / "pool.yaml").read_text())
    assert raw["format"] == "nasdose-pool" and raw["version"] == 1 and raw["diversity"]["members"] == ["m0", "m1"]
    back = load_pool(tmp_path / "pool.yaml")
    assert back.names == ["m0", "m1"] and back.space == "lenas" and back.seed == 0
    assert [m.genotype for m in back.members] == [m.genotype for m in pool.members]
    assert back.members[0].search_score == 3.21 and back.members[0].metrics == {"params": 1000.0}
    for key, m in pool.matrices.items():
        np.testing.assert_array_equal(back.matrices[key], m)  # NaN survives as .nan
    assert back.config == {"pool_size": 2} and back.predictions == "test predictions"


def edit(tmp_path, change) -> str:
    save_pool(tmp_path / "pool.yaml", make_pool())
    data = yaml.safe_load((tmp_path / "pool.yaml").read_text())
    change(data)
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(data))
    return str(tmp_path / "pool.yaml")


def _set(path, value):
    def change(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set(["format"], "other"), "not a nasdose pool file"),
    (_set(["version"], 2), "pool version 2 is not supported"),
    (_set(["space"], "nowhere"), "unknown search space 'nowhere'"),
    (_set(["members", 1, "genotype", "choices", "down.op1"], "warp_drive"),
     r"member m1: invalid genotype .*warp_drive"),
    (_set(["members", 0, "genotype", "space"], "lenas_levels"), "member m0: invalid genotype"),
    (_set(["members", 1, "name"], "m0"), "member names are not unique"),
    (_set(["members", 0, "search_score"], "good"), "member m0: search_score must be a number"),
    (_set(["members", 0, "metrics"], {"params": "many"}), "member m0: metrics must map names to numbers"),
    (_set(["members"], []), "'members' must be a non-empty list"),
    (_set(["diversity", "members"], ["m1", "m0"]), r"diversity.members \[.*\] do not match the members"),
    (_set(["diversity", "disagreement"], [[0.0, 0.1]]), r"diversity.disagreement must be a 2×2 matrix"),
    (_set(["diversity", "genotype_distance"], [[0.0, 0.1], [0.2, 0.0]]),
     "diversity.genotype_distance is not symmetric"),
    (_set(["seed"], "zero"), "'seed' must be an integer"),
])
def test_validation_names_file_and_member(tmp_path, change, message):
    path = edit(tmp_path, change)
    with pytest.raises(NasDoseError, match=f"pool.yaml: {message}"):
        load_pool(path)


def test_duplicate_genotypes_are_refused(tmp_path):
    path = edit(tmp_path, lambda d: d["members"][1].update(genotype=d["members"][0]["genotype"]))
    with pytest.raises(NasDoseError, match="member m1: same genotype as member m0"):
        load_pool(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(NasDoseError, match="nothere.yaml: file not found"):
        load_pool(tmp_path / "nothere.yaml")
    (tmp_path / "bad.yaml").write_text("members: [\n")
    with pytest.raises(NasDoseError, match="bad.yaml: invalid YAML"):
        load_pool(tmp_path / "bad.yaml")
