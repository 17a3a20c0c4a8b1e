"""score_sde.sample_plots: the score field with sample paths that ``--mode sample`` draws for 2-D data."""
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

import fast_sampling
import losses
import run_lib
from score_sde import checkpoints, sample_plots, toy
from tests.helpers import make_sde


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_is_2d():
    assert sample_plots.is_2d((5, 2)) and sample_plots.is_2d((5, 1, 1, 2))
    assert not sample_plots.is_2d((5, 3)) and not sample_plots.is_2d((5, 8, 8, 1))


def test_plot_of_the_exact_mixture_score_with_recorded_paths(tmp_path):
    """The exact score of a 2-D mixture and DDIM paths drawn with it: one panel per time, each different."""
    sde = make_sde("vpsde")
    mixture = toy.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 1.0]], [0.3, 0.3])

    def score(points, t):
        return np.asarray(mixture.score(sde, points, np.full(len(points), t, np.float32)))

    z = jax.random.normal(jax.random.PRNGKey(0), (32, 2))
    _, _, path = jax.jit(lambda z: fast_sampling.ddim(None, lambda x, t: mixture.score(sde, x, t), sde, z, steps=8,
                                                      record=fast_sampling.Recording(frames=4)))(z)
    times = sample_plots.panel_times(1e-3, sde.T)
    file = tmp_path / "field.png"
    sample_plots.plot_score_field(str(file), score, times, np.asarray(path), title="ddim")
    pixels = _png(file)
    width = pixels.shape[1]
    assert width > 3 * pixels.shape[0]  # one row of len(times) panels
    panels = [pixels[:, k * width // len(times):(k + 1) * width // len(times)] for k in range(len(times))]
    assert all(p.std() > 10 for p in panels)  # drawn, not blank
    # The field changes with time: the panels at T and at eps differ beyond their titles.
    assert np.mean(np.any(panels[0] != panels[-1], axis=-1)) > 0.05


def test_bad_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\(frames, n, 2\)"):
        sample_plots.plot_score_field(str(tmp_path / "x.png"), lambda p, t: p, [0.5], np.zeros((3, 4, 3)))


def test_sample_mode_writes_the_plot_for_2d_data(tmp_path):
    """``--mode sample`` on a GMM checkpoint (the mlp model, untrained): score_field.png, no GIF, NFE recorded."""
    from configs.vp import gmm

    config = gmm.get_config()
    config.model.nf = 16
    config.model.num_res_blocks = 1
    config.eval.batch_size = 8
    config.sampling.method = "heun"
    config.sampling.steps = 3
    _, state = losses.init_train_state(jax.random.PRNGKey(0), config)
    checkpoints.save_checkpoint(str(tmp_path / "checkpoints"), state, step=1)
    info = run_lib.sample(config, str(tmp_path))
    folder = pathlib.Path(info["folder"])
    assert (folder / "score_field.png").exists() and not (folder / "reverse_process.gif").exists()
    assert _png(folder / "score_field.png").std() > 10
    assert json.loads((folder / "sample_info.json").read_text())["nfe"] == 6
    # Points keep their coordinates (float32, data space), not 256 grey levels; no image grids of points.
    samples = np.load(folder / "samples.npz")["samples"]
    assert samples.dtype == np.float32 and samples.shape == (8, 2)
    assert len(np.unique(samples)) == samples.size and not list(folder.glob("grid_*.png"))
