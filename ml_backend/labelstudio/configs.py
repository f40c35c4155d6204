"""Label Studio label configs of the two projects of a round, generated from a class list.

Rating project: the photo and the target model's prediction side by side (a pre-blended overlay
PNG in a second ``<Image>``, as in the paper's rating GUI), a required single choice 1-5 and an
"out of domain" flag. Task data keys: :data:`IMAGE_KEY`, :data:`OVERLAY_KEY`.

Segmentation project: ``<BrushLabels>`` over the classes in the VOC colours on the photo. Task data
key: :data:`IMAGE_KEY`. Pixels no brush covers are exported as ignore (255), so ``background`` is a
label like the others.

:func:`validate_rating_config` / :func:`validate_segmentation_config` check an existing project's
config has the controls we read and write, and return their names.

The one reader of a segmentation config's brush control is :func:`brush_controls_of` (on a parsed
XML element); :func:`find_brush_controls` (the ML backend: the first ``<BrushLabels>`` of any
name) and :func:`validate_segmentation_config` (round projects: the ``label`` control and the
experiment's classes) are built on it. :func:`is_segmentation_config` (webhook filtering) only
asks whether the config has a ``<BrushLabels>`` at all.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from ..classes import VOC_CLASSES, palette_hex
from ..errors import MadsegError

#: Task data keys.
IMAGE_KEY = "image"
OVERLAY_KEY = "overlay"
#: Control / object names (``from_name`` / ``to_name`` of results).
IMAGE_NAME = "image"
OVERLAY_NAME = "overlay"
RATING_FROM = "rating"
OOD_FROM = "ood"
BRUSH_FROM = "label"
#: The rating choices, score 1 first, and the out-of-domain flag's single choice.
RATING_CHOICES: tuple[str, ...] = ("1 bad", "2 poor", "3 fair", "4 good", "5 excellent")
OOD_CHOICE = "out of domain"

RATING_INSTRUCTIONS = (
    "Left: the photo. Right: the model's segmentation drawn over it (each colour is one object "
    "class). Rate how well the coloured regions cover the objects: 1 bad, 2 poor, 3 fair, 4 good, "
    "5 excellent. Tick 'out of domain' when the photo shows none of the classes the model knows "
    "(e.g. food, coral, microscope images) or is not a photo at all."
)
SEGMENTATION_INSTRUCTIONS = (
    "The model's segmentation is pre-filled. Correct it: pick a class and paint, use the eraser to "
    "remove wrong paint, and paint 'background' where there is no object. Leave a pixel unpainted "
    "only when you cannot tell what it is (it is ignored in training). Submit when done."
)


def _check_classes(classes: Sequence[str]) -> list[str]:
    names = [str(c).strip() for c in classes]
    if not names:
        raise MadsegError("the class list is empty; give at least one class name")
    if any(not n for n in names):
        raise MadsegError("the class list has an empty class name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MadsegError(f"the class list names {dup} more than once; class names must be unique")
    if len(names) > 256:
        raise MadsegError(f"{len(names)} classes: at most 256 fit a palette mask")
    return names


def class_colours(classes: Sequence[str]) -> list[str]:
    """``#rrggbb`` colour of each class: the VOC palette in class order."""
    return palette_hex(len(classes))


def rating_config(title: str = "Rate the segmentation") -> str:
    """The rating project's label config (photo | overlay, 1-5 rating, out-of-domain flag)."""
    choices = "\n".join(f'      <Choice value={quoteattr(c)}/>' for c in RATING_CHOICES)
    return f"""<View>
  <Header value={quoteattr(title)}/>
  <View style="display: flex; gap: 12px; align-items: flex-start">
    <View style="flex: 1; min-width: 0">
      <Header value="Photo" size="5"/>
      <Image name="{IMAGE_NAME}" value="${IMAGE_KEY}" zoom="true"/>
    </View>
    <View style="flex: 1; min-width: 0">
      <Header value="Model's segmentation" size="5"/>
      <Image name="{OVERLAY_NAME}" value="${OVERLAY_KEY}" zoom="true"/>
    </View>
  </View>
  <Header value="How good is the segmentation?" size="4"/>
  <Choices name="{RATING_FROM}" toName="{IMAGE_NAME}" choice="single-radio" required="true" showInline="true">
{choices}
  </Choices>
  <Choices name="{OOD_FROM}" toName="{IMAGE_NAME}" choice="multiple" showInline="true">
      <Choice value={quoteattr(OOD_CHOICE)}/>
  </Choices>
</View>
"""


def segmentation_config(classes: Sequence[str] = VOC_CLASSES) -> str:
    """The segmentation project's label config: brush labels over ``classes`` in VOC colours."""
    names = _check_classes(classes)
    labels = "\n".join(
        f"    <Label value={quoteattr(n)} background={quoteattr(c)}/>"
        for n, c in zip(names, class_colours(names), strict=True)
    )
    return f"""<View>
  <Image name="{IMAGE_NAME}" value="${IMAGE_KEY}" zoom="true" zoomControl="true"/>
  <BrushLabels name="{BRUSH_FROM}" toName="{IMAGE_NAME}">
{labels}
  </BrushLabels>
</View>
"""


@dataclass(frozen=True)
class RatingControls:
    """Names found in a rating project's config."""

    rating_from: str
    rating_to: str
    ood_from: str
    ood_to: str
    image_key: str
    overlay_key: str


class LabelConfigError(MadsegError):
    """A label config lacks the control we need (e.g. no ``<BrushLabels>`` over an ``<Image>``)."""


@dataclass(frozen=True)
class BrushControls:
    """Names found in a segmentation project's config: brush control (``from_name``), the
    ``<Image>`` it labels (``to_name``), that image's task data key, the labels in order."""

    from_name: str
    to_name: str
    image_key: str
    labels: tuple[str, ...]


def _parse(config: str, what: str) -> ET.Element:
    try:
        return ET.fromstring(config)
    except ET.ParseError as exc:
        raise MadsegError(f"{what}'s label config is not valid XML ({exc}); recreate the project") from None


def _value_key(el: ET.Element | None) -> str | None:
    v = (el.get("value") or "") if el is not None else ""
    return v[1:] if v.startswith("$") else None


def brush_controls_of(root: ET.Element, brush: ET.Element) -> BrushControls | None:
    """The names of one ``<BrushLabels>`` element of the config ``root``; None when the ``<Image>``
    it labels (its first ``toName``, default :data:`IMAGE_NAME`) is not in the config."""
    to_name = (brush.get("toName") or IMAGE_NAME).split(",")[0].strip()
    image = next((el for el in root.iter("Image") if el.get("name") == to_name), None)
    if image is None:
        return None
    labels = tuple(el.get("value") or "" for el in brush.iter("Label"))
    return BrushControls(brush.get("name") or "", to_name, _value_key(image) or IMAGE_KEY, labels)


def is_segmentation_config(label_config: str) -> bool:
    """True when the label config has a ``<BrushLabels>`` control (a segmentation project).

    A config that is not XML is not a segmentation config.
    """
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError:
        return False
    return any(el.tag == "BrushLabels" for el in root.iter())


def find_brush_controls(label_config: str | None) -> BrushControls:
    """The first ``<BrushLabels>`` control of a label config (any name) and the ``<Image>`` it labels.

    Raises :class:`LabelConfigError` when the config has none, or it labels no ``<Image>``.
    """
    root: ET.Element | None = None
    if label_config:
        try:
            root = ET.fromstring(label_config)
        except ET.ParseError as exc:
            raise LabelConfigError(f"label config is not valid XML ({exc})") from None
    for brush in root.iter("BrushLabels") if root is not None else ():
        controls = brush_controls_of(root, brush)
        if controls is None:
            raise LabelConfigError(
                f"label config: <BrushLabels name={brush.get('name')!r}> is not attached to an <Image>"
            )
        return controls
    raise LabelConfigError(
        "label config has no <BrushLabels> control over an <Image>; connect the ML backend to a "
        "segmentation project"
    )


def validate_rating_config(config: str, project: str = "rating project") -> RatingControls:
    """Check a rating project's label config has our controls; their names, or a clear error.

    Needs: ``<Choices name="rating">`` with the five :data:`RATING_CHOICES`, ``<Choices name="ood">``
    with :data:`OOD_CHOICE`, and ``<Image>`` objects for :data:`IMAGE_KEY` and :data:`OVERLAY_KEY`.
    """
    root = _parse(config, project)
    hint = "; create it with `madseg ls create-round` (ml_backend.labelstudio.configs.rating_config)"
    choices = {el.get("name"): el for el in root.iter("Choices")}
    images = {el.get("name"): el for el in root.iter("Image")}
    rating = choices.get(RATING_FROM)
    if rating is None:
        raise MadsegError(f"{project}'s label config lacks the rating control {RATING_FROM!r}{hint}")
    values = tuple(c.get("value") for c in rating.iter("Choice"))
    if values != RATING_CHOICES:
        raise MadsegError(
            f"{project}'s rating control {RATING_FROM!r} has choices {list(values)}; expected "
            f"{list(RATING_CHOICES)}{hint}"
        )
    ood = choices.get(OOD_FROM)
    if ood is None or OOD_CHOICE not in [c.get("value") for c in ood.iter("Choice")]:
        raise MadsegError(
            f"{project}'s label config lacks the out-of-domain flag {OOD_FROM!r} "
            f"(choice {OOD_CHOICE!r}){hint}"
        )
    for name in (IMAGE_NAME, OVERLAY_NAME):
        if name not in images:
            raise MadsegError(f"{project}'s label config lacks the <Image name={name!r}>{hint}")
    return RatingControls(
        rating_from=RATING_FROM, rating_to=rating.get("toName") or IMAGE_NAME,
        ood_from=OOD_FROM, ood_to=ood.get("toName") or IMAGE_NAME,
        image_key=_value_key(images[IMAGE_NAME]) or IMAGE_KEY,
        overlay_key=_value_key(images[OVERLAY_NAME]) or OVERLAY_KEY,
    )


def validate_segmentation_config(
    config: str, classes: Sequence[str] | None = None, project: str = "segmentation project"
) -> BrushControls:
    """Check a segmentation project's config has the brush control (with every class of ``classes``
    as a label, when given); its names, or a clear error."""
    root = _parse(config, project)
    hint = "; create it with `madseg ls create-round` (ml_backend.labelstudio.configs.segmentation_config)"
    brush = next((el for el in root.iter("BrushLabels") if el.get("name") == BRUSH_FROM), None)
    if brush is None:
        raise MadsegError(f"{project}'s label config lacks the brush control {BRUSH_FROM!r}{hint}")
    controls = brush_controls_of(root, brush)
    if classes is not None:
        labels = tuple(el.get("value") or "" for el in brush.iter("Label"))
        missing = [c for c in _check_classes(classes) if c not in labels]
        if missing:
            raise MadsegError(f"{project}'s brush labels lack the classes {missing}{hint}")
    if controls is None:
        to_name = (brush.get("toName") or IMAGE_NAME).split(",")[0].strip()
        raise MadsegError(f"{project}'s label config lacks the <Image name={to_name!r}>{hint}")
    return controls
