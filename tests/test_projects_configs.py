"""Label configs: generated from a class list, parsed back by the validators."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from ml_backend.classes import VOC_CLASSES, palette_hex
from ml_backend.errors import MadsegError
from ml_backend.labelstudio import configs


def test_rating_config_has_our_controls():
    cfg = configs.rating_config("exp, round 1")
    root = ET.fromstring(cfg)
    images = [el.get("name") for el in root.iter("Image")]
    assert images == [configs.IMAGE_NAME, configs.OVERLAY_NAME]
    rating = next(el for el in root.iter("Choices") if el.get("name") == configs.RATING_FROM)
    assert rating.get("required") == "true" and rating.get("choice") == "single-radio"
    assert tuple(c.get("value") for c in rating.iter("Choice")) == (
        "1 bad", "2 poor", "3 fair", "4 good", "5 excellent")
    ctl = configs.validate_rating_config(cfg)
    names = (ctl.rating_from, ctl.ood_from, ctl.image_key, ctl.overlay_key)
    assert names == ("rating", "ood", "image", "overlay")


def test_segmentation_config_uses_voc_colours():
    cfg = configs.segmentation_config()
    labels = [(el.get("value"), el.get("background")) for el in ET.fromstring(cfg).iter("Label")]
    assert labels == list(zip(VOC_CLASSES, palette_hex(21), strict=True))
    assert labels[15] == ("person", "#c08080")
    ctl = configs.validate_segmentation_config(cfg, VOC_CLASSES)
    assert (ctl.from_name, ctl.to_name, ctl.image_key) == ("label", "image", "image")


def test_custom_class_list_and_escaping():
    cfg = configs.segmentation_config(["background", 'a "quoted" & <odd> class'])
    ctl = configs.validate_segmentation_config(cfg)
    assert ctl.labels == ("background", 'a "quoted" & <odd> class')


@pytest.mark.parametrize("classes,msg",
                         [([], "empty"), (["a", "a"], "more than once"), (["a", " "], "empty")])
def test_bad_class_lists(classes, msg):
    with pytest.raises(MadsegError, match=msg):
        configs.segmentation_config(classes)


def test_rating_validator_errors():
    cfg = configs.rating_config()
    msg = "rating project X's label config lacks the rating control 'rating'"
    with pytest.raises(MadsegError, match=msg):
        configs.validate_rating_config(cfg.replace('name="rating"', 'name="stars"'), "rating project X")
    with pytest.raises(MadsegError, match="has choices"):
        configs.validate_rating_config(cfg.replace('"3 fair"', '"3 ok"'))
    with pytest.raises(MadsegError, match="out-of-domain flag"):
        configs.validate_rating_config(cfg.replace('name="ood"', 'name="flag"'))
    with pytest.raises(MadsegError, match="<Image name='overlay'>"):
        configs.validate_rating_config(cfg.replace('name="overlay"', 'name="pred"'))
    with pytest.raises(MadsegError, match="not valid XML"):
        configs.validate_rating_config("<View><Image")


def test_segmentation_validator_errors():
    cfg = configs.segmentation_config(["background", "cat"])
    with pytest.raises(MadsegError, match="lack the classes \\['dog'\\]"):
        configs.validate_segmentation_config(cfg, ["background", "cat", "dog"], "segmentation project 4")
    with pytest.raises(MadsegError, match="lacks the brush control 'label'"):
        configs.validate_segmentation_config(configs.rating_config())
