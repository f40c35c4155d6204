"""MOS with the out-of-domain veto, the choice of S, and parsing rating annotations."""

from __future__ import annotations

import math

import pytest

from projects.mos import Rating, RatingError, choose_lowest, mean_opinion_scores, parse_rating_result


def _r(choice=None, ood=False):
    out = []
    if choice is not None:
        out.append({"from_name": "rating", "to_name": "image", "type": "choices",
                    "value": {"choices": [choice]}})
    if ood:
        out.append({"from_name": "ood", "to_name": "image", "type": "choices",
                    "value": {"choices": ["out of domain"]}})
    return out


def test_parse_rating():
    assert parse_rating_result(_r("1 bad"), "t") == (1, False)
    assert parse_rating_result(_r("5 excellent", ood=True), "t") == (5, True)
    assert parse_rating_result(_r(None, ood=True), "t") == (1, True)  # OOD makes the score irrelevant
    other = [{"from_name": "comment", "value": {"text": ["hi"]}}] + _r("3 fair")
    assert parse_rating_result(other, "t") == (3, False)


@pytest.mark.parametrize(
    "result,msg",
    [
        (_r(None), "no score"),
        (_r("6 perfect"), "unknown rating choice '6 perfect'"),
        (_r("2 poor") + _r("3 fair"), "more than one score"),
        ([{"from_name": "rating", "value": {"choices": ["2 poor", "3 fair"]}}], "more than one score"),
        ([{"from_name": "rating", "value": {}}], "no list of choices"),
        ([{"from_name": "ood", "value": {"choices": ["maybe"]}}], "unknown out-of-domain choice"),
        ("garbage", "not a list"),
        ([42], "not an object"),
    ],
)
def test_parse_rating_errors_name_the_annotation(result, msg):
    with pytest.raises(RatingError, match=f"project 2, task 5, annotation 9: .*{msg}"):
        parse_rating_result(result, "project 2, task 5, annotation 9")


def test_mos_with_ood_veto_and_duplicates():
    ratings = [
        Rating("a", 1, 2, False, 1, 10), Rating("a", 2, 3, False, 1, 11), Rating("a", 3, 4, False, 1, 12),
        Rating("b", 1, 5, False, 2, 13), Rating("b", 2, 5, True, 2, 14),   # one OOD flag vetoes
        Rating("c", 1, 1, False, 3, 15), Rating("c", 1, 4, False, 3, 20),  # same rater twice: latest
    ]
    mos = mean_opinion_scores(ratings)
    assert mos == {"a": 3.0, "b": math.inf, "c": 4.0}
    assert mean_opinion_scores({"x": [(1, False), (2, False)], "y": [(5, True)]}) == {"x": 1.5, "y": math.inf}
    with pytest.raises(RatingError, match="outside 1..5"):
        mean_opinion_scores({"x": [(7, False)]})


def test_choose_lowest_ties_and_exclusions():
    mos = {"d": 2.0, "b": 1.0, "a": 2.0, "c": math.inf, "e": float("nan"), "f": 1.5}
    assert choose_lowest(mos, 3) == ["b", "f", "a"]  # tie 2.0: smaller id first
    assert choose_lowest(mos, 10) == ["b", "f", "a", "d"]  # OOD and NaN never chosen
    assert choose_lowest(mos, 2, exclude=["b"]) == ["f", "a"]
    assert choose_lowest(mos, 0) == []
