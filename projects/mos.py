"""Mean opinion scores from ratings, with the out-of-domain veto, and the choice of S (pure logic).

A rating is one rater's verdict on one image: a score 1..5 and an out-of-domain (OOD) flag. The
MOS of an image is the mean score of its raters; if any rater flags it OOD the MOS is ``+inf``
(the image can never be among the worst-rated, so it is never labelled). S is the ``n`` images
with the lowest finite MOS; ties go to the smaller image id, so the choice is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ml_backend.errors import MadsegError
from ml_backend.labelstudio.configs import OOD_CHOICE, OOD_FROM, RATING_CHOICES, RATING_FROM


class RatingError(MadsegError):
    """A rating annotation cannot be read (no score, unknown choice, two scores...)."""


@dataclass(frozen=True)
class Rating:
    """One rater's rating of one image (``rater``: the Label Studio user id)."""

    image_id: str
    rater: int
    score: int
    ood: bool
    task_id: int | None = None
    annotation_id: int | None = None


def parse_rating_result(
    result: Sequence[Mapping[str, Any]],
    where: str,
    *,
    rating_from: str = RATING_FROM,
    ood_from: str = OOD_FROM,
    choices: Sequence[str] = RATING_CHOICES,
    ood_choice: str = OOD_CHOICE,
) -> tuple[int, bool]:
    """The (score 1..5, OOD flag) of a rating annotation's ``result`` list.

    ``where`` (e.g. ``"project 3, task 17, annotation 40"``) names the annotation in errors.
    Raises :class:`RatingError` when the score is missing (unless the image is flagged OOD, which
    makes the score irrelevant: it then counts as 1), given twice, or not one of ``choices``.
    """
    if not isinstance(result, (list, tuple)):
        raise RatingError(f"{where}: annotation result is {type(result).__name__}, not a list")
    score: int | None = None
    ood = False
    for item in result:
        if not isinstance(item, Mapping):
            raise RatingError(f"{where}: a result entry is {type(item).__name__}, not an object")
        name = item.get("from_name")
        value = item.get("value")
        picked = value.get("choices") if isinstance(value, Mapping) else None
        if name not in (rating_from, ood_from):
            continue
        if not isinstance(picked, list) or not all(isinstance(c, str) for c in picked):
            raise RatingError(f"{where}: result {name!r} has no list of choices")
        if name == ood_from:
            unknown = [c for c in picked if c != ood_choice]
            if unknown:
                raise RatingError(f"{where}: unknown out-of-domain choice {unknown[0]!r}")
            ood = ood or bool(picked)
            continue
        if score is not None or len(picked) != 1:
            raise RatingError(f"{where}: more than one score given; a rating has exactly one")
        if picked[0] not in choices:
            raise RatingError(
                f"{where}: unknown rating choice {picked[0]!r}; expected one of {list(choices)}"
            )
        score = list(choices).index(picked[0]) + 1
    if score is None:
        if ood:
            return 1, True
        raise RatingError(f"{where}: no score ({rating_from!r}) in the rating; the annotation is incomplete")
    return score, ood


def mean_opinion_scores(
    ratings: Iterable[Rating] | Mapping[str, Iterable[tuple[int, bool]]],
) -> dict[str, float]:
    """Image id -> mean score of its raters, ``+inf`` when any rater flagged it out of domain.

    ``ratings``: :class:`Rating` objects (a rater who rated an image twice counts once, with the
    rating of the larger annotation id), or a mapping image id -> (score, ood) pairs.
    Images without ratings do not appear.
    """
    per_image: dict[str, list[tuple[int, bool]]] = {}
    if isinstance(ratings, Mapping):
        for image_id, pairs in ratings.items():
            per_image[str(image_id)] = [(int(s), bool(o)) for s, o in pairs]
    else:
        latest: dict[tuple[str, int], Rating] = {}
        for r in ratings:
            key = (r.image_id, r.rater)
            old = latest.get(key)
            if old is None or (r.annotation_id or 0) >= (old.annotation_id or 0):
                latest[key] = r
        for r in latest.values():
            per_image.setdefault(r.image_id, []).append((r.score, r.ood))
    out: dict[str, float] = {}
    for image_id, pairs in per_image.items():
        if not pairs:
            continue
        bad = [s for s, _ in pairs if not 1 <= s <= len(RATING_CHOICES)]
        if bad:
            raise RatingError(f"image {image_id}: score {bad[0]} outside 1..{len(RATING_CHOICES)}")
        if any(o for _, o in pairs):
            out[image_id] = math.inf
        else:
            out[image_id] = sum(s for s, _ in pairs) / len(pairs)
    return out


def choose_lowest(mos: Mapping[str, float], n: int, exclude: Iterable[str] = (),
                  order: Sequence[str] | None = None) -> list[str]:
    """S: the ``n`` image ids with the lowest finite MOS, lowest first; ties: earlier in ``order``
    (e.g. M's rating order; ids not in it after), then smaller id first.

    Out-of-domain images (``+inf``), NaN scores and ``exclude`` ids are never chosen; fewer than
    ``n`` ids come back when fewer qualify. The round's ``choose`` stage and ``madseg ratings``
    both choose with this function.
    """
    if n < 0:
        raise MadsegError(f"n4 = {n}: the number of images to label must be >= 0")
    skip = {str(e) for e in exclude}
    pos = {k: i for i, k in enumerate(order or ())}
    finite = sorted((v, pos.get(k, len(pos)), k) for k, v in mos.items()
                    if k not in skip and math.isfinite(v))
    return [k for _, _, k in finite[:n]]


def rating_counts(ratings: Iterable[Rating]) -> dict[str, int]:
    """Image id -> number of distinct raters."""
    raters: dict[str, set[int]] = {}
    for r in ratings:
        raters.setdefault(r.image_id, set()).add(r.rater)
    return {k: len(v) for k, v in raters.items()}
