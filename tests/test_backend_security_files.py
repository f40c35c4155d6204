"""Local-files task URLs (ml_backend.localfiles): only image files inside the servable folders
under the document root, after ``..`` and symlinks; ground truth never. Each refusal beside a
positive control."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ml_backend.errors import MadsegError
from ml_backend.localfiles import LocalFileRefused, LocalFilesPolicy, local_files_param


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/pool/{a.jpg, sub/b.png}, root/gt/a.png (ground truth), root/other/c.jpg, secret outside."""
    root = tmp_path / "root"
    for rel in ("pool/a.jpg", "pool/sub/b.png", "gt/a.png", "other/c.jpg", "pool/notes.txt", "models/x.png"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"img")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"secret")
    (root / "pool" / "link.jpg").symlink_to(secret)
    (root / "pool" / "gtlink").symlink_to(root / "gt")
    (root / "pool" / "loop.jpg").symlink_to(root / "pool" / "loop.jpg")
    return {"root": root, "pool": root / "pool", "gt": root / "gt", "secret": secret,
            "models": root / "models"}


def test_file_inside_the_root_is_read_positive_control(tree) -> None:
    pol = LocalFilesPolicy.build(tree["root"], denied=[tree["gt"]])
    assert pol.read("pool/a.jpg") == b"img"
    assert pol.resolve("pool/sub/b.png") == (tree["pool"] / "sub" / "b.png").resolve()
    assert pol.read(str(tree["pool"] / "a.jpg")) == b"img"  # absolute, but inside the root


@pytest.mark.parametrize("d, match", [
    ("../secret.jpg", "outside"),
    ("pool/../../secret.jpg", "outside"),
    ("pool/link.jpg", "outside"),                       # symlink out of the root
    ("/etc/passwd", "absolute path outside"),
    ("pool/notes.txt", "not an image"),
    ("gt/a.png", "never serves"),
    ("pool/gtlink/a.png", "never serves"),              # symlink into the ground truth
    ("models/x.png", "never serves"),
    ("pool\x00.jpg", "NUL"),
    ("", "empty"),
])
def test_refused_local_paths(tree, d: str, match: str) -> None:
    pol = LocalFilesPolicy.build(tree["root"], denied=[tree["gt"], tree["models"]])
    with pytest.raises(LocalFileRefused, match=match):
        pol.read(d)


def test_absolute_path_outside_the_root_is_refused_even_when_it_exists(tree) -> None:
    pol = LocalFilesPolicy.build(tree["root"])
    with pytest.raises(LocalFileRefused, match="outside"):
        pol.read(str(tree["secret"]))


def test_servable_folders_narrow_the_root(tree) -> None:
    pol = LocalFilesPolicy.build(tree["root"], servable=[tree["pool"]])
    assert pol.read("pool/a.jpg") == b"img"  # positive control
    with pytest.raises(LocalFileRefused, match="outside the folders"):
        pol.read("other/c.jpg")


def test_symlink_loop_and_missing_file(tree) -> None:
    pol = LocalFilesPolicy.build(tree["root"])
    with pytest.raises((LocalFileRefused, FileNotFoundError)):
        pol.read("pool/loop.jpg")
    with pytest.raises(FileNotFoundError):
        pol.read("pool/missing.jpg")


def test_size_cap(tree) -> None:
    (tree["pool"] / "big.jpg").write_bytes(b"x" * 2000)
    pol = LocalFilesPolicy.build(tree["root"], max_bytes=1000)
    assert pol.read("pool/a.jpg") == b"img"
    with pytest.raises(LocalFileRefused, match="over the limit"):
        pol.read("pool/big.jpg")


def test_a_root_of_slash_is_refused_unless_narrowed(tree) -> None:
    with pytest.raises(MadsegError, match="document root of /"):
        LocalFilesPolicy.build("/")
    pol = LocalFilesPolicy.build("/", servable=[tree["pool"]])
    assert pol.read(os.path.relpath(tree["pool"] / "a.jpg", "/")) == b"img"
    with pytest.raises(LocalFileRefused):
        pol.read("etc/passwd")
    with pytest.raises(MadsegError, match="outside the document root"):
        LocalFilesPolicy.build(tree["pool"], servable=[tree["root"] / "other"])


def test_local_files_param() -> None:
    assert local_files_param("/data/local-files/?d=pool/a%20b.jpg") == "pool/a b.jpg"
    assert local_files_param("http://ls:8080/data/local-files?d=x.jpg") == "x.jpg"
    assert local_files_param("/data/upload/1/x.jpg") is None
    with pytest.raises(LocalFileRefused):
        local_files_param("/data/local-files/?e=1")


def test_a_symlink_swapped_in_after_the_check_is_refused(tree, monkeypatch) -> None:
    """resolve() checked pool/a.jpg; by the time it is opened it has become a link to a file outside
    (simulated by making resolve() hand back the link): the opened file is checked again."""
    pol = LocalFilesPolicy.build(tree["root"])
    swapped = tree["pool"] / "swapped.jpg"
    swapped.symlink_to(tree["secret"])
    monkeypatch.setattr(LocalFilesPolicy, "resolve", lambda self, d: swapped)
    with pytest.raises(LocalFileRefused, match="outside"):
        pol.read("pool/a.jpg")
    monkeypatch.setattr(LocalFilesPolicy, "resolve", lambda self, d: tree["pool"] / "a.jpg")
    assert pol.read("pool/a.jpg") == b"img"  # positive control
