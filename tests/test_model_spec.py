"""One vocabulary for model specs: ModelSpec from a command-line string (ModelSpec.parse), from a
TOML table (ml_backend.zoo.model_spec_from_table) and from a dict (ModelSpec.from_dict) agree; the
class lives torch-free in ml_backend.modelspec (re-exported by ml_backend.zoo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ml_backend.errors import MadsegError, ModelError
from ml_backend.zoo import ModelSpec, model_spec_from_table


def test_cli_string_values_and_round_trip() -> None:
    spec = ModelSpec.parse(" espnetv2 , checkpoint=/m/a.pth, scale=0.5,input_size=256, bf16=true, mode=fast ")
    assert spec == ModelSpec("espnetv2", "/m/a.pth", {"scale": 0.5, "input_size": 256, "bf16": True,
                                                       "mode": "fast"})
    assert isinstance(spec.options["input_size"], int)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert ModelSpec.parse("tflite") == ModelSpec("tflite")


def test_the_three_spellings_give_the_same_spec(tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pth"
    from_cli = ModelSpec.parse(f"espnetv2,checkpoint={ckpt},scale=2.0,input_size=384")
    from_toml = model_spec_from_table({"name": "espnetv2", "checkpoint": "w.pth",
                                       "options": {"scale": 2.0, "input_size": 384}},
                                      tmp_path / "models.toml", "[target]")
    from_dict = ModelSpec.from_dict({"name": "espnetv2", "checkpoint": str(ckpt), "scale": 2.0,
                                     "input_size": 384})
    assert from_cli == from_toml == from_dict


@pytest.mark.parametrize("text, message", [
    ("", "must start with a model name"),
    ("scale=0.5", "must start with a model name"),
    ("espnetv2,scale", "is not key=value"),
])
def test_bad_cli_strings_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as info:
        ModelSpec.parse(text)
    assert isinstance(info.value, MadsegError) and "\n" not in str(info.value)


def test_the_spec_module_imports_no_torch() -> None:
    """Torch-free modules (the experiment schema, round plans, the backend's settings, the sampler's
    CLI) carry specs: importing ``ml_backend.modelspec`` must not load torch or the zoo."""
    code = ("import sys, ml_backend.modelspec; "
            "bad = [m for m in ('torch', 'ml_backend.zoo') if m in sys.modules]; "
            "assert not bad, bad; "
            # and the modules that carry specs without loading a model
            "import projects.stage_results, ml_backend.experiment_settings, ml_backend.backend_config, "
            "sampler.cli; assert 'torch' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    # positive control: the zoo does load torch, so the check can see it
    zoo = "import sys, ml_backend.zoo; assert 'torch' in sys.modules"
    control = subprocess.run([sys.executable, "-c", zoo], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    assert control.returncode == 0, control.stderr


def test_one_class_everywhere_and_of() -> None:
    from ml_backend import modelspec
    from ml_backend.zoo import base

    assert modelspec.ModelSpec is ModelSpec is base.ModelSpec
    spec = ModelSpec("espnetv2", None, {"scale": 0.5})
    assert ModelSpec.of(spec) is spec
    assert ModelSpec.of({"name": "espnetv2", "checkpoint": None, "options": {"scale": 0.5}}) == spec
    with pytest.raises(ModelError, match="needs a 'name'"):
        ModelSpec.of({"checkpoint": "x.pth"})


def test_madseg_score_config_gives_model_specs(tmp_path: Path) -> None:
    """``madseg score --config``: [target] / [[competitors]] read by the one table reader, as ModelSpecs."""
    from sampler.cli import read_models_config

    cfg = tmp_path / "models.toml"
    cfg.write_text('[target]\nname = "espnetv2"\ncheckpoint = "w.pth"\noptions = { scale = 0.5 }\n'
                   '[[competitors]]\nname = "tflite"\n', encoding="utf-8")
    target, comps = read_models_config(cfg)
    assert target == ModelSpec("espnetv2", str(tmp_path / "w.pth"), {"scale": 0.5})
    assert comps == [ModelSpec("tflite")]
    cfg.write_text('[target]\nname = "espnetv2"\noptions = { seed = "x" }\n'
                   '[[competitors]]\nname = "tflite"\n', encoding="utf-8")
    with pytest.raises(MadsegError, match=r"\[target\]: seed"):
        read_models_config(cfg)
