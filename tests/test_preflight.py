"""Pre-flight checks (projects/preflight.py): every failure kind beside a positive control."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_backend.classes import VOC_CLASSES
from ml_backend.shared import shared_dir
from projects.experiment import load_experiment
from projects.preflight import (
    PreflightError,
    backend_problem,
    class_problem,
    format_problems,
    label_studio_problem,
    model_problems,
    redis_problem,
    require_preflight,
)
from projects.simulation.ls_local import free_port
from tests.experiments import DICE, ESP, write_experiment_toml

SHARED = shared_dir()

pytestmark = pytest.mark.usefixtures("cache_in_tmp", "one_torch_thread")


def write_experiment(tmp: Path, competitors: str, *, ls_url: str = "http://127.0.0.1:9",
                     backend_url: str | None = None) -> Path:
    """An experiment on the shared data with the ESPNetv2 s=0.5 target and the given competitor tables."""
    backend = f'backend_url = "{backend_url}"\n' if backend_url else ""
    return write_experiment_toml(tmp, "preflight", f"""
[pool]
folders = ["{{shared}}/data/coco_voc/images"]

[target]
key = "esp"
name = "espnetv2"
checkpoint = "{ESP}"

{competitors}

[s0]
root = "{{shared}}/data/voc_samples"

[t0]
root = "{{shared}}/data/voc_samples"

[selection]
n3 = 2
n4 = 1

[label_studio]
url = "{ls_url}"
api_key_env = "MADSEG_PREFLIGHT_TEST_KEY"
{backend}""")


GOOD = f'[[competitors]]\nkey = "dice"\nname = "dicenet"\ncheckpoint = "{DICE}"\n'


def test_class_problem_is_pure() -> None:
    assert class_problem(VOC_CLASSES, VOC_CLASSES) is None
    assert class_problem(tuple(f"LABEL_{i}" for i in range(21)), VOC_CLASSES) is None  # generic: by position
    assert "predicts 150 classes" in (class_problem([f"c{i}" for i in range(150)], VOC_CLASSES) or "")
    assert "add options.class_map" in (class_problem([f"c{i}" for i in range(150)], VOC_CLASSES) or "")
    swapped = list(VOC_CLASSES)
    swapped[8], swapped[15] = swapped[15], swapped[8]
    assert "class 8 is 'person' but the experiment's class 8 is 'cat' (2 differ)" in (
        class_problem(swapped, VOC_CLASSES) or "")
    text = format_problems(["a", "b"], "x.toml")
    head = "pre-flight check of x.toml found 2 problem(s); nothing was run:"
    assert text.splitlines() == [head, "  - a", "  - b"]


def test_models_positive_control(tmp_path: Path) -> None:
    exp = load_experiment(write_experiment(tmp_path, GOOD))
    assert model_problems(exp, device="cpu") == []


@pytest.mark.parametrize(("table", "expected"), [
    ('[[competitors]]\nkey = "x"\nname = "espnet"\n',
     r"model \[\[competitors\]\] x: unknown model name 'espnet'"),
    (f'[[competitors]]\nkey = "x"\nname = "dicenet"\ncheckpoint = "{ESP}"\n',
     r"model \[\[competitors\]\] x: checkpoint .*espnetv2_s_0\.5_pascal_256x256\.pth does not fit dicenet"),
    ('[[competitors]]\nkey = "x"\nname = "torchvision:lraspp_mobilenet_v3_large"\n'
     'options = { weights = "random", num_classes = 5, input_size = 64 }\n',
     r"model \[\[competitors\]\] x: predicts 5 classes .* but the experiment has 21; add options\.class_map"),
    ('[[competitors]]\nkey = "x"\nname = "espnetv2"\noptions = { scale = 0.5, class_names = '
     + str([*VOC_CLASSES[:20], "monitor"]).replace("'", '"') + " }\n",
     r"model \[\[competitors\]\] x: class 20 is 'monitor' but the experiment's class 20 is 'tvmonitor'"),
])
def test_model_failures(tmp_path: Path, table: str, expected: str) -> None:
    exp = load_experiment(write_experiment(tmp_path, GOOD + "\n" + table))
    problems = model_problems(exp, device="cpu")
    assert len(problems) == 1, problems  # the good models pass: one line for the bad one
    assert re.search(expected, problems[0]), problems[0]


def test_class_map_fixes_a_class_mismatch(tmp_path: Path) -> None:
    five = ["background", "aeroplane", "person", "cat", "dog"]
    mapping = tmp_path / "five.toml"
    mapping.write_text("[map]\n" + "".join(f'{n} = "{n}"\n' for n in five))
    base = ('[[competitors]]\nkey = "x"\nname = "torchvision:lraspp_mobilenet_v3_large"\n'
            f'options = {{ weights = "random", num_classes = 5, input_size = 64, class_names = {five!r}'
            .replace("'", '"'))
    bad = load_experiment(write_experiment(tmp_path, base + " }\n"))
    assert len(model_problems(bad, device="cpu")) == 1
    good = load_experiment(write_experiment(tmp_path, base + ', class_map = "five.toml" }\n'))
    assert good.competitors[0].options["class_map"] == str(mapping)  # relative to the experiment file
    assert model_problems(good, device="cpu") == []


@pytest.mark.server
def test_label_studio(ls_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MADSEG_PREFLIGHT_TEST_KEY", raising=False)
    assert "environment variable MADSEG_PREFLIGHT_TEST_KEY is not set" in (
        label_studio_problem(ls_server.url, "MADSEG_PREFLIGHT_TEST_KEY") or "")
    monkeypatch.setenv("MADSEG_PREFLIGHT_TEST_KEY", ls_server.api_key)
    assert label_studio_problem(ls_server.url, "MADSEG_PREFLIGHT_TEST_KEY") is None  # positive control
    down = f"http://127.0.0.1:{free_port()}"
    problem = label_studio_problem(down, "MADSEG_PREFLIGHT_TEST_KEY", timeout_s=2) or ""
    assert problem.startswith(f"Label Studio at {down} unreachable"), problem
    monkeypatch.setenv("MADSEG_PREFLIGHT_TEST_KEY", "not-a-valid-token")
    problem = label_studio_problem(ls_server.url, "MADSEG_PREFLIGHT_TEST_KEY") or ""
    assert "HTTP 401" in problem and "check LABEL_STUDIO_API_KEY" in problem, problem


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "UP"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, type[_Health]]]:
    handler = type("H", (_Health,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()


def test_backend_url(http_server: tuple[str, type[_Health]]) -> None:
    url, handler = http_server
    assert backend_problem(url) is None  # positive control: /health answers 200
    handler.status = 401
    assert backend_problem(url) is None  # basic auth on: it answers
    handler.status = 404
    assert "answers HTTP 404; is that address a madseg backend?" in (backend_problem(url) or "")
    down = f"http://127.0.0.1:{free_port()}"
    assert f"ML backend: {down}/health does not answer" in (backend_problem(down, timeout_s=2) or "")


@pytest.mark.redis
def test_redis() -> None:
    assert redis_problem("redis://127.0.0.1:6379/0") is None  # positive control: the real Redis
    problem = redis_problem(f"redis://user:secret@127.0.0.1:{free_port()}/0", timeout_s=2) or ""
    assert problem.startswith("Redis: redis://***@127.0.0.1:") and "does not answer PING" in problem
    assert "secret" not in problem


def test_require_preflight_lists_every_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               http_server: tuple[str, type[_Health]]) -> None:
    monkeypatch.delenv("MADSEG_PREFLIGHT_TEST_KEY", raising=False)
    down = f"http://127.0.0.1:{free_port()}"
    exp = load_experiment(write_experiment(tmp_path, GOOD + '\n[[competitors]]\nkey = "y"\nname = "nope"\n',
                                           backend_url=down))
    with pytest.raises(PreflightError) as err:
        require_preflight(exp, "exp.toml", backend_url=down, device="cpu")
    lines = str(err.value).splitlines()
    assert lines[0] == "pre-flight check of exp.toml found 3 problem(s); nothing was run:"
    assert [line.split(":")[0] for line in lines[1:]] == ["  - Label Studio", "  - ML backend",
                                                          "  - model [[competitors]] y"]
    # positive control: only the good models, and no services asked for
    good = load_experiment(write_experiment(tmp_path, GOOD, backend_url=http_server[0]))
    require_preflight(good, "exp.toml", label_studio=False, backend_url=http_server[0], device="cpu")
