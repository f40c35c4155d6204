"""Class-map alignment (ml_backend/zoo/classmap.py): the arithmetic, map files and their errors,
the shipped ADE20K/COCO -> VOC maps, and mapped models (torch and not) with their versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ml_backend.classes import VOC_CLASSES
from ml_backend.errors import ModelError
from ml_backend.shared import shared_dir
from ml_backend.zoo import load_model, read_class_map, shipped_class_maps
from ml_backend.zoo.classmap import MappedSegmentationModel, map_probs, mapping_matrix, parse_class_map

ESP = shared_dir() / "models" / "espnetv2" / "espnetv2_s_0.5_pascal_256x256.pth"
VOC = {n: i for i, n in enumerate(VOC_CLASSES)}

pytestmark = pytest.mark.usefixtures("cache_in_tmp", "one_torch_thread")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_map_probs_arithmetic() -> None:
    # source classes: 0 sky, 1 wall, 2 person, 3 animal (ignored); target: background, person
    table = np.array([0, 0, 1, -1])
    m = mapping_matrix(table, 2)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1)
    out = map_probs(p, m)[0, :, 0, 0]
    # mapped mass 0.6 renormalised: background 0.3 / 0.6, person 0.3 / 0.6 (the 0.4 ignored mass drops out)
    assert torch.allclose(out, torch.tensor([0.5, 0.5]), atol=1e-5)
    p2 = torch.tensor([0.02, 0.03, 0.15, 0.8]).view(1, 4, 1, 1)  # mostly ignored: the mapped classes decide
    out2 = map_probs(p2, m)[0, :, 0, 0]
    assert out2.argmax() == 1 and torch.allclose(out2, torch.tensor([0.25, 0.75]), atol=1e-4)
    only_ignored = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 4, 1, 1)  # no mapped mass: uniform
    assert torch.allclose(map_probs(only_ignored, m)[0, :, 0, 0], torch.tensor([0.5, 0.5]), atol=1e-5)
    rnd = torch.softmax(torch.randn(3, 4, 5, 6), 1)
    assert torch.allclose(map_probs(rnd, m).sum(1), torch.ones(3, 5, 6), atol=1e-5)


def test_map_files_names_indices_and_errors(tmp_path: Path) -> None:
    model_classes = ("sky", "wall", "human", "dog", "kitten")
    toml = _write(tmp_path / "mine.toml", 'target_classes = ["background", "person", "cat"]\n[map]\n'
                  'sky = "background"\nwall = "background"\nhuman = "person"\n"4" = "cat"\ndog = "ignore"\n')
    cmap = read_class_map(str(toml))
    assert cmap.name == "mine" and cmap.target_classes == ("background", "person", "cat")
    assert cmap.resolve(model_classes).tolist() == [0, 0, 1, -1, 2]
    data = {"name": "j", "target_classes": ["background", "person", "cat"],
            "map": {"0": "background", "human": "person"}}
    js = _write(tmp_path / "mine.json", json.dumps(data))
    assert read_class_map(str(js)).resolve(model_classes).tolist() == [0, -1, 1, -1, -1]  # unmapped: ignore

    def bad(text: str, match: str, classes: tuple[str, ...] = model_classes, suffix: str = ".toml") -> None:
        path = _write(tmp_path / f"bad{suffix}", text)
        with pytest.raises(ModelError, match=rf"class map .*bad{suffix}: {match}"):
            read_class_map(str(path)).resolve(classes)

    bad('[map]\nhuman = "persn"\n', r"map\.human = 'persn' is not a target class")
    bad('[map]\nhorse = "horse"\n', r"source class 'horse' is not a class of the model")
    bad('[map]\n"9" = "person"\n', r"source index 9 is out of range; the model has 5 classes")
    bad('[map]\nhuman = "person"\n"2" = "cat"\n', r"source class 2 is mapped twice")
    bad('[map]\nhuman = "ignore"\n', r"maps no source class to a target class")
    bad('[map]\nhuman = 3\n', r"map\.human must be a target class name or \"ignore\", got 3")
    bad('source_classes = ["a", "b"]\n[map]\na = "person"\n', r"lists 2 source_classes but the model has 5")
    bad('colour = "red"\n[map]\nhuman = "person"\n', r"unknown key 'colour'")
    bad('[map\nhuman = "person"\n', r"not valid TOML")
    bad('{"map": {"human": "person"', r"not valid JSON", suffix=".json")
    bad('target_classes = ["x"]\n[map]\nhuman = "x"\n', r"target_classes must be \"voc\" or a list")
    with pytest.raises(ModelError, match=r"class map .*nothere\.toml: file not found; use a shipped map"):
        read_class_map(str(tmp_path / "nothere.toml"))


def test_shipped_maps() -> None:
    assert set(shipped_class_maps()) == {"ade20k-voc", "coco-panoptic-voc"}
    ade = read_class_map("ade20k-voc")
    assert ade.target_classes == VOC_CLASSES and ade.source_classes and len(ade.source_classes) == 150
    t = ade.resolve([f"class_{i}" for i in range(150)])  # generic model names: the map's list decides
    src = {n: i for i, n in enumerate(ade.source_classes)}
    assert t[src["person"]] == VOC["person"] == t[12]
    assert t[src["wall"]] == t[src["sky"]] == VOC["background"]
    assert t[src["airplane"]] == VOC["aeroplane"] and t[src["minibike"]] == VOC["motorbike"]
    assert t[src["van"]] == VOC["car"] and t[src["crt screen"]] == VOC["tvmonitor"]
    assert t[src["animal"]] == t[src["table"]] == t[src["plant"]] == -1  # ambiguous: ignored
    coco = read_class_map("coco-panoptic-voc")
    assert coco.source_classes and len(coco.source_classes) == 133
    c = coco.resolve(coco.source_classes)
    csrc = {n: i for i, n in enumerate(coco.source_classes)}
    assert c[csrc["couch"]] == VOC["sofa"] and c[csrc["motorcycle"]] == VOC["motorbike"]
    assert c[csrc["dining table"]] == VOC["diningtable"] and c[csrc["tv"]] == VOC["tvmonitor"]
    assert c[csrc["elephant"]] == c[csrc["sky-other-merged"]] == VOC["background"]
    assert c[csrc["truck"]] == -1
    assert set(c.tolist()) - {-1} == set(range(21))  # every VOC class has a COCO source
    with pytest.raises(ModelError, match=r"lists 133 source_classes but the model has 150"):
        coco.resolve([f"class_{i}" for i in range(150)])


def test_mapped_torch_model_probabilities_version_and_checkpoints(tmp_path: Path) -> None:
    base = load_model("espnetv2", ESP, device="cpu")
    swap = _write(tmp_path / "swap.toml", "[map]\n" + "".join(
        f'{n} = "{ {"person": "cat", "cat": "person"}.get(n, n) }"\n' for n in VOC_CLASSES))
    mapped = load_model("espnetv2", ESP, device="cpu", class_map=str(swap))
    assert mapped.trainable and mapped.class_names == VOC_CLASSES
    assert mapped.spec.options["class_map"] == str(swap.resolve())
    x = torch.randn(2, 3, 256, 256)
    p, q = base.forward(x), mapped.forward(x)
    perm = list(range(21))
    perm[VOC["person"]], perm[VOC["cat"]] = VOC["cat"], VOC["person"]
    assert torch.allclose(q, p[:, perm], atol=1e-4)
    # checkpoints keep the source model's format; the spec (with the map) reloads the same version
    assert set(mapped.checkpoint_state()) == set(base.checkpoint_state())
    again = load_model(mapped.spec.name, mapped.spec.checkpoint, **dict(mapped.spec.options))
    assert again.version == mapped.version
    # the version: differs from the base, follows the map's content, not its path
    assert mapped.version != base.version
    assert mapped.version.startswith(base.version.split("@")[0] + "-to-swap@")
    (tmp_path / "sub").mkdir()
    copy = _write(tmp_path / "sub" / "swap.toml", swap.read_text())
    assert load_model("espnetv2", ESP, class_map=str(copy)).version == mapped.version
    same_name = "name = \"swap\"\n[map]\n" + "".join(f'{n} = "{n}"\n' for n in VOC_CLASSES)  # other content
    other = _write(tmp_path / "id.toml", same_name)
    assert load_model("espnetv2", ESP, class_map=str(other)).version != mapped.version


class _Ade(nn.Module):
    """A 150-class 'ADE20K model' that is sure of class 12 (person) everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 150, x.shape[2], x.shape[3])
        logits[:, 12] = 5.0
        logits[:, 126] = 4.0  # 'animal': ignored
        return logits + 0 * x.mean()


def test_ade_model_joins_a_voc_experiment(tmp_path: Path) -> None:
    path = tmp_path / "ade.pt"
    torch.jit.save(torch.jit.trace(_Ade(), torch.zeros(1, 3, 32, 32)), str(path))
    raw = load_model(str(path), input_size=32)
    assert raw.num_classes == 150
    mapped = load_model(str(path), input_size=32, class_map="ade20k-voc")
    assert isinstance(mapped, MappedSegmentationModel) and not mapped.trainable
    assert mapped.class_names == VOC_CLASSES and mapped.spec.options["class_map"] == "ade20k-voc"
    pred = mapped.predict([np.zeros((20, 30, 3), np.uint8)])[0]
    assert pred.shape == (20, 30) and (pred == VOC["person"]).all()
    proba = mapped.predict_proba([np.zeros((9, 9, 3), np.uint8)])[0]
    assert proba.shape == (21, 9, 9) and np.allclose(proba.sum(0), 1, atol=1e-5)
    with pytest.raises(ModelError, match=r"class_map must be a shipped map name"):
        load_model(str(path), input_size=32, class_map="")


def test_parse_class_map_is_pure() -> None:
    cmap = parse_class_map({"map": {"a": "person"}}, "inline", "inline")
    assert cmap.name == "inline" and cmap.target_classes == VOC_CLASSES
    assert cmap.digest(cmap.resolve(["a", "b"])) != cmap.digest(np.array([-1, 15]))


def test_name_order_warning(caplog: pytest.LogCaptureFixture) -> None:
    ade = read_class_map("ade20k-voc")
    assert ade.source_classes is not None
    names = list(ade.source_classes)
    names[7] = "bed "  # the Hugging Face id2label spelling: still the same class
    names[8] = "windowpane, window"
    with caplog.at_level("WARNING"):
        ade.resolve(names)
    assert not caplog.records
    names[0], names[1] = names[1], names[0]  # another order: warned
    with caplog.at_level("WARNING"):
        ade.resolve(names)
    assert "2 of the model's class names differ" in caplog.text and "class 0: model 'building'" in caplog.text


def test_mapped_checkpoint_round_trip(tmp_path: Path) -> None:
    """What fine-tuning does with a mapped torch model: save checkpoint_state(), reload with the spec."""
    swap = _write(tmp_path / "swap.toml",
                  '[map]\nbackground = "background"\nperson = "cat"\ncat = "person"\n')
    mapped = load_model("espnetv2", ESP, device="cpu", class_map=str(swap))
    state = mapped.checkpoint_state()
    key = "bu_dec_l4.merge_layer.3.bias"
    state[key] = state[key] + 0.5  # "trained"
    ckpt = tmp_path / "tuned.pth"
    torch.save(state, ckpt)
    tuned = load_model(mapped.spec.name, ckpt, **dict(mapped.spec.options))
    assert tuned.class_names == VOC_CLASSES and tuned.version != mapped.version
    assert torch.equal(tuned.checkpoint_state()[key], state[key])
    x = torch.randn(1, 3, 256, 256)
    p = tuned.forward(x)
    assert torch.allclose(p.sum(1), torch.ones(1, 256, 256), atol=1e-5)
    only_three = {VOC["background"], VOC["person"], VOC["cat"]}
    assert set(p.argmax(1).unique().tolist()) <= only_three  # unmapped VOC classes get (almost) no mass
