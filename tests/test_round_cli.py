"""`madseg round` / `madseg demo` options (projects.round_cli), parsed without running anything."""

from __future__ import annotations

from projects.cli import build_parser


def test_the_demo_leaves_the_lwf_variant_out_unless_asked_and_the_round_trains_it() -> None:
    p = build_parser()
    assert p.parse_args(["demo"]).lwf is False  # keeps `make demo` within its time budget
    assert p.parse_args(["demo", "--lwf-variant"]).lwf is True
    assert p.parse_args(["round", "--config", "x.toml"]).lwf is True  # positive control: unchanged
    assert p.parse_args(["round", "--config", "x.toml", "--no-lwf"]).lwf is False
