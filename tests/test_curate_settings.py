"""Stage settings: one typed definition per stage (cultureclip.curate.stages.settings); the shipped
config groups agree with it, and every stage refuses unknown keys alike, naming them."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cultureclip.curate.registry import Context
from cultureclip.curate.stages import settings as S

CONF = Path(__file__).resolve().parents[1] / "cultureclip" / "conf"
GROUPS = {"concepts": ("default.yaml", S.Concepts), "dedup": ("default.yaml", S.Dedup),
          "twins": ("default.yaml", S.Twins), "captions": ("default.yaml", S.Captions),
          "render": ("sd35_turbo.yaml", S.Render), "judge": ("qwen25_vl.yaml", S.Judge),
          "export": ("default.yaml", S.Export)}
FREE_FORM = {"chat", "embedding", "rule", "ray"}  # checked by their own readers (ChatConfig, embeddings, rule)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_shipped_defaults_agree_with_the_typed_settings(group):
    name, cls = GROUPS[group]
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / group / name))
    typed = S.typed(cls, yaml, group)  # no unknown key in the shipped file
    defaults = S.typed(cls, {}, group)
    assert set(yaml) == set(defaults), "the file spells out every setting"
    assert strip(yaml) == strip(defaults) == strip(typed)


def strip(d):
    """Settings without the free-form backend mappings, at any depth."""
    return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in FREE_FORM}


@pytest.mark.parametrize("stage", sorted(GROUPS))
def test_every_stage_refuses_unknown_keys_alike(stage, tmp_path):
    import importlib
    module = importlib.import_module(f"cultureclip.curate.stages.{stage}")
    with pytest.raises(ValueError, match=rf"unknown {stage} settings \['no_such_key'\]; known: \["):
        module.run({"no_such_key": 1}, Context(out_dir=tmp_path, chat={"base_url": "http://127.0.0.1:1/v1",
                                                                         "model": "m"}))
    nested = {"concepts": {"top_down": {"n_per_cel": 2}}}.get(stage)
    if nested:
        with pytest.raises(ValueError, match=r"unknown concepts.top_down settings \['n_per_cel'\]"):
            module.run(nested, Context(out_dir=tmp_path))
