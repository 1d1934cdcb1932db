"""The search's fitness figure: a PNG for any log, without matplotlib warnings."""
import warnings

import pytest

from nas_dose.pool.plots import plot_fitness


@pytest.mark.parametrize("scores", [[], [7.5, 6.0, float("nan"), 6.5]])
def test_fitness_plot_is_written_without_warnings(tmp_path, scores):
    path = tmp_path / "fitness.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a legend with nothing to name
        plot_fitness(scores, ["candidate"] * len(scores), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
