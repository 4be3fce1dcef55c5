"""The package builds as a regular (non-editable) wheel that carries its configs and data files, and
importing it never pulls in the benchmark drivers (open_clip's trainer) nor patches another library."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import sys, cultureclip
from pathlib import Path
from cultureclip import CultureCLIP
from hydra import compose, initialize_config_dir
pkg = Path(cultureclip.__file__).parent
assert str(pkg).startswith(sys.argv[1]), pkg          # imported from the installed wheel, not the repo
m = CultureCLIP.from_pretrained("cultureclip-tiny")   # the shipped model config is registered
with initialize_config_dir(str(pkg / "conf"), version_base="1.3"):
    cfg = compose("train", overrides=["+experiment=cultwin", "data.train_shards=x", "data.val_shards=y"])
assert cfg.model.name == "ViT-B-32-quickgelu"
from cultureclip.eval.zeroshot import IMAGENET_CLASSNAMES_FILE
assert len(Path(IMAGENET_CLASSNAMES_FILE).read_text().splitlines()) == 1000
print("ok")
"""


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir)], check=True, cwd=tmp_path)
    wheel = next(wheel_dir.glob("cultureclip-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "cultureclip/conf/train.yaml" in names and "cultureclip/conf/experiment/cultwin.yaml" in names
    assert "cultureclip/model_configs/cultureclip-tiny.json" in names
    assert "cultureclip/curate/prompts/judge_scores.txt" in names  # prompt files: their text is in the keys
    assert not any(n.startswith(("tests/", "tools/", "benchmarks/", "docs/")) for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


IMPORT_ALL = r"""
import importlib, pkgutil, sys, cultureclip
for m in pkgutil.walk_packages(cultureclip.__path__, "cultureclip."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
assert "open_clip_train" not in sys.modules, "a package module imports open_clip_train"
print("ok")
"""


def test_no_package_module_patches_other_libraries():
    """Static guard: the benchmark harnesses (benchmarks/) may drive and patch open_clip_train, the package
    may not."""
    forbidden = re.compile(r"^\s*(from|import)\s+open_clip_train|sys\.modules\[[^]]+\]\s*=|monkeypatch", re.M)
    for path in sorted((ROOT / "cultureclip").rglob("*.py")):
        found = forbidden.search(path.read_text())
        assert found is None, f"{path.relative_to(ROOT)}: {found.group(0)!r}"
    assert forbidden.search((ROOT / "benchmarks" / "train_harness.py").read_text())  # the pattern does match


@pytest.mark.slow
def test_importing_every_module_leaves_open_clip_train_unimported():
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
