"""The backend runs on maintained Flask/Werkzeug/Jinja2/itsdangerous releases, not on the old pins of
label-studio-ml 1.0.9, and torch is at a release where ``torch.load(weights_only=True)`` is safe.

``make install`` installs label-studio-ml with ``--no-deps`` (requirements-nodeps.txt) after
``pip install -e '.[dev]'``; pyproject.toml declares what ``LabelStudioMLBase`` really imports.
These tests check the installed environment and the declarations, and that the label-studio-ml
base class and the backend app work on it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
#: The oldest releases accepted: the newest ones, without published advisories (older ones have
#: some, e.g. Flask < 3.1.1 CVE-2025-47278, Werkzeug < 3.0.6 CVE-2024-49767, Jinja2 < 3.1.6
#: CVE-2025-27516; label-studio-ml pins Flask 1.1.2 / Werkzeug 2.0.2 / Jinja2 3.0.3).
SAFE = {"flask": "3.1.3", "werkzeug": "3.1.9", "jinja2": "3.1.6", "itsdangerous": "2.2.0"}
#: What label-studio-ml 1.0.9 pins and we deliberately do not install (`attr` is not `attrs`).
LSML_PINS = {"flask", "werkzeug", "jinja2", "itsdangerous", "attr"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _declared() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    return {r.name.lower(): r for r in reqs}


def _nodeps_pins() -> dict[str, str]:
    lines = [ln.strip() for ln in (REPO / "requirements-nodeps.txt").read_text().splitlines()]
    return dict(ln.split("==", 1) for ln in lines if ln and not ln.startswith("#"))


def test_installed_web_stack_is_at_or_above_the_safe_floors() -> None:
    for name, floor in SAFE.items():
        assert Version(version(name)) >= Version(floor), (
            f"{name} {version(name)} is older than {floor}: run `make install` (or "
            f"`pip install -U '{name}>={floor}'`)")


def test_pyproject_declares_the_safe_floors_and_a_safe_torch() -> None:
    declared = _declared()
    for name, floor in SAFE.items():
        spec = declared[name].specifier
        assert floor in spec, f"pyproject.toml must allow {name} {floor}"
        older = Version(floor).release[:-1] + (Version(floor).release[-1] - 1,)
        assert not spec.contains(".".join(map(str, older))), f"pyproject.toml allows {name} below {floor}"
    # torch.load(weights_only=True) is bypassable below 2.6 (CVE-2025-32434)
    assert not declared["torch"].specifier.contains("2.5.1") and declared["torch"].specifier.contains("2.6.0")
    assert Version(version("torch").split("+")[0]) >= Version("2.6")
    # label-studio-ml is not a dependency (its pins would drag the old stack in) but installed no-deps
    assert "label-studio-ml" not in declared
    assert _nodeps_pins() == {"label-studio-ml": "1.0.9"}
    for line in ("pip install -e '.[dev]'", "pip install --no-deps -r requirements-nodeps.txt"):
        assert line in (REPO / "Makefile").read_text()
    assert "--no-deps -r requirements-nodeps.txt" in (REPO / "Dockerfile").read_text()


def test_label_studio_ml_base_imports_without_flask_on_this_stack() -> None:
    assert version("label-studio-ml") == _nodeps_pins()["label-studio-ml"]
    probe = ("import json, sys; from label_studio_ml.model import LabelStudioMLBase; "
             "from ml_backend.model import MadsegSegmenter; "
             "print(json.dumps([issubclass(MadsegSegmenter, LabelStudioMLBase), "
             "sorted({m.split('.')[0] for m in sys.modules} & {'flask', 'werkzeug', 'itsdangerous'})]))")
    base_only = probe.replace("from ml_backend.model import MadsegSegmenter; ", "").replace(
        "issubclass(MadsegSegmenter, LabelStudioMLBase)", "True")
    res = subprocess.run([sys.executable, "-c", base_only], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.splitlines()[-1]) == [True, []]  # the base class never imports Flask
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.splitlines()[-1])[0] is True


def test_every_requirement_is_met_except_label_studio_mls_own_pins() -> None:
    """``pip check`` over the whole environment: the only complaints are label-studio-ml's pins of the
    old web stack (which proves they are really lifted); anything else broken fails."""
    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip() and not ln.startswith("No broken")]
    others = [ln for ln in lines if not ln.lower().startswith("label-studio-ml 1.0.9 ")]
    assert others == [], "\n".join(others)
    named = set()
    for ln in lines:
        m = re.search(r"(?:has requirement|requires) ([A-Za-z0-9_.-]+)", ln)
        assert m, ln
        named.add(m.group(1).lower())
    assert named <= LSML_PINS, named
    assert "flask" in named and "werkzeug" in named  # the old pins are not what is installed


def test_label_studio_server_does_not_pin_the_web_stack() -> None:
    """label-studio==1.23.2 (the dev extra: the real server for tests and the demo) and the SDK do
    not depend on Flask/Werkzeug/Jinja2/itsdangerous at all, so they do not conflict."""
    for dist in ("label-studio", "label-studio-sdk"):
        for req in map(Requirement, requires(dist) or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                assert req.name.lower() not in SAFE, f"{dist} requires {req}"


def test_the_backend_app_serves_on_this_stack(tmp_path) -> None:
    import flask
    import werkzeug

    from ml_backend.app import create_app
    from ml_backend.backend_config import BackendConfig

    cfg = BackendConfig(target={"name": "espnetv2", "checkpoint": None, "options": {}}, model_dir=tmp_path)
    client = create_app(cfg).test_client()
    resp = client.get("/health")
    assert resp.status_code == 200 and resp.get_json()["status"] == "UP"
    assert resp.get_json()["model_class"] == "MadsegSegmenter"
    assert client.get("/no-such-route").status_code == 404
    # the app runs on the installed stack, which is the maintained one
    assert Path(flask.__file__).is_relative_to(Path(werkzeug.__file__).parents[1])
    assert Version(version("flask")) >= Version(SAFE["flask"])
    assert Version(version("werkzeug")) >= Version(SAFE["werkzeug"])


def test_backend_without_label_studio_ml_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from ml_backend.backend_cli import require_label_studio_ml
    from ml_backend.errors import MadsegError

    require_label_studio_ml()  # positive control: installed by `make install`
    monkeypatch.setitem(sys.modules, "label_studio_ml.model", None)
    with pytest.raises(MadsegError, match="pip install --no-deps -r requirements-nodeps.txt"):
        require_label_studio_ml()
