"""The CLI on bad model input (issue 9, item 9): unloadable checkpoints and wrongly typed TOML values give
ONE error line naming the file and key, exit status 2, no traceback; ``madseg round`` refuses an
experiment whose models do not load before it starts. Each run is a real ``madseg`` subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ml_backend.shared import shared_dir
from tests.test_preflight import DICE, ESP, GOOD, write_experiment

ROOT = Path(__file__).resolve().parents[1]
MADSEG = [sys.executable, "-m", "projects.cli"]
SHARED = shared_dir()
POOL = SHARED / "data" / "voc_samples" / "images"

pytestmark = pytest.mark.slow


def madseg(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MADSEG_CACHE": env.pop("cache", ""),
         **env}
    return subprocess.run([*MADSEG, *args], env=e, cwd=ROOT, capture_output=True, text=True, timeout=600)


def one_error(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The run failed with status 2 and exactly one error line that contains every needle."""
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, p.stderr[-2000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def _models_toml(tmp: Path, target: str) -> Path:
    competitor = f'name = "dicenet"\ncheckpoint = "{DICE}"'
    cfg = tmp / "models.toml"
    text = f"[target]\n{target}\n\n[[competitors]]\n{competitor}\n".replace("{shared}", str(SHARED))
    cfg.write_text(text)
    return cfg


def test_score_config_wrong_types_and_garbage_checkpoint(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"hello world\n" * 50)  # made torch.load raise KeyError (a traceback) before
    esp = "name = \"espnetv2\"\n"
    cases = [
        (esp + "checkpoint = 5", ("models.toml", "[target]", "checkpoint must be a file path string")),
        (esp + 'options = "x"', ("models.toml", "[target]", "options must be a table")),
        (esp + 'options = { seed = "x" }', ("models.toml", "[target]", "seed must be a non-negative")),
        (esp + f'checkpoint = "{garbage}"', ("garbage.pth", "not a readable PyTorch weights file")),
        (f'name = "dicenet"\ncheckpoint = "{ESP}"',
         ("espnetv2_s_0.5_pascal_256x256.pth", "does not fit dicenet")),
        ('name = "espnet"', ("unknown model name 'espnet'",)),
    ]
    for target, needles in cases:
        cfg = _models_toml(tmp_path, target)
        one_error(madseg(["score", str(POOL), "--store", store, "--config", str(cfg), "--no-progress"],
                         cache=str(tmp_path / "cache")), *needles)
    # positive control: the same command with good tables scores the pool
    cfg = _models_toml(tmp_path, f'name = "espnetv2"\ncheckpoint = "{ESP}"')
    p = madseg(["score", str(POOL), "--store", store, "--config", str(cfg), "--no-progress"],
               cache=str(tmp_path / "cache"))
    assert p.returncode == 0 and "scored 14 images" in p.stdout, p.stderr[-2000:]


def test_finetune_garbage_checkpoints(tmp_path: Path) -> None:
    # more garbage variants (random bytes, pickles, zips) are checked in-process in tests/test_zoo.py
    garbage = [b"\x80\x02" + bytes(range(256)) * 4]
    for i, data in enumerate(garbage):
        bad = tmp_path / f"bad{i}.pth"
        bad.write_bytes(data)
        p = madseg(["finetune", "--model", "espnetv2", "--checkpoint", str(bad), "--train", str(POOL.parent),
                    "--out", str(tmp_path / "ft"), "--no-progress"], cache=str(tmp_path / "cache"))
        one_error(p, f"bad{i}.pth", "not a readable PyTorch weights file")


def test_round_checks_models_before_starting(tmp_path: Path) -> None:
    env = {"cache": str(tmp_path / "cache"), "MADSEG_PREFLIGHT_TEST_KEY": ""}
    bad_tables = [
        ('[[competitors]]\nkey = "x"\nname = "espnet"\n', "unknown model name 'espnet'"),
        (f'[[competitors]]\nkey = "x"\nname = "dicenet"\ncheckpoint = "{ESP}"\n', "does not fit dicenet"),
    ]
    for table, needle in bad_tables:
        cfg = write_experiment(tmp_path, GOOD + "\n" + table)
        p = madseg(["round", "--config", str(cfg), "--quiet", "--device", "cpu"], **env)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
        lines = p.stderr.splitlines()
        head = next(i for i, line in enumerate(lines) if "error: pre-flight check of exp.toml" in line)
        problems = [line for line in lines[head + 1:] if line.startswith("  - ")]
        where = [line.split(":")[0] for line in problems]
        assert where == ["  - Label Studio", "  - model [[competitors]] x"]
        assert needle in problems[1]
        assert not (tmp_path / "exp" / "round-1").exists()  # nothing ran
    # positive control: good models leave only the Label Studio line (no server in this test)
    good = write_experiment(tmp_path, GOOD)
    p = madseg(["round", "--config", str(good), "--quiet", "--device", "cpu"], **env)
    assert p.returncode == 2 and "found 1 problem(s)" in p.stderr, p.stderr[-2000:]
    assert "  - Label Studio" in p.stderr and "model [" not in p.stderr


def test_experiment_wrong_types_name_file_and_key(tmp_path: Path) -> None:
    cases = [
        ('[[competitors]]\nkey = "x"\nname = "dicenet"\ncheckpoint = 5\n',
         ("exp.toml", "[[competitors]] #1 checkpoint must be a path string, got 5")),
        ('[[competitors]]\nkey = "x"\nname = "dicenet"\noptions = "x"\n',
         ("exp.toml", "[[competitors]] #1 options must be a table")),
        ('[[competitors]]\nkey = "x"\nname = "dicenet"\noptions = { seed = "x" }\n',
         ("exp.toml", "[[competitors]] #1 options.seed must be a non-negative integer, got 'x'")),
        ('[[competitors]]\nkey = "x"\nname = "dicenet"\noptions = { class_map = "nope.toml" }\n',
         ("exp.toml", "options.class_map: file", "nope.toml does not exist")),
    ]
    for table, needles in cases:
        cfg = write_experiment(tmp_path, table)
        one_error(madseg(["round", "--config", str(cfg), "--quiet"], cache=str(tmp_path / "cache")), *needles)


def test_demo_checks_models_before_starting_servers(tmp_path: Path) -> None:
    cfg = write_experiment(tmp_path, GOOD + '\n[[competitors]]\nkey = "y"\nname = "nope"\n')
    run = tmp_path / "run"
    p = madseg(["demo", "--config", str(cfg), "--dir", str(run), "--port", "1", "--backend-port", "2"],
               cache=str(tmp_path / "cache"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "error: pre-flight check of the demo's models found 1 problem(s)" in p.stderr
    assert "  - model [[competitors]] y: unknown model name 'nope'" in p.stderr
    assert not run.exists()  # no Label Studio data dir, no credentials: nothing was started
