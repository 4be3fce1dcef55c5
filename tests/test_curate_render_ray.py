"""The Ray Data render path on a local Ray instance (CPU actors): same records and images as a plain run.

Starting Ray and an actor that imports diffusers takes 40-80 s on a busy 2-core machine, beyond the
30 s budget of slow tests, so this test also needs ``CULTURECLIP_TEST_RAY=1``.
"""
import os
from pathlib import Path

import pytest

from cultureclip.curate.stages import render
from cultureclip.curate.runner import Store
from cultureclip.curate.registry import Context

from test_curate_render import CFG, N_UNIQUE, PAIRS, images

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("CULTURECLIP_TEST_RAY") != "1",
                                 reason="starts Ray (40-80 s); set CULTURECLIP_TEST_RAY=1")]


def test_ray_render_matches_single_process(tmp_path):
    ray = pytest.importorskip("ray")
    repo = str(Path(render.__file__).parents[2])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}})
    try:
        rep = render.run_pairs(PAIRS, {**CFG, "ray": {"concurrency": 1, "jobs_per_batch": 3}},
                               Context(out_dir=tmp_path / "ray"))
        assert (rep.ok, rep.errors, rep.extra["ray_actors"]) == (N_UNIQUE, 0, 1)
        again = render.run_pairs(PAIRS, {**CFG, "ray": {"concurrency": 1}}, Context(out_dir=tmp_path / "ray"))
        assert (again.done_before, again.processed) == (N_UNIQUE, 0)
    finally:
        ray.shutdown()
    render.run_pairs(PAIRS, CFG, Context(out_dir=tmp_path / "plain"))
    key = lambda r: r["key"]  # noqa: E731
    assert sorted(Store(tmp_path / "ray" / "render", "render").records(), key=key) == \
        sorted(Store(tmp_path / "plain" / "render", "render").records(), key=key)
    assert images(tmp_path / "ray") == images(tmp_path / "plain")
