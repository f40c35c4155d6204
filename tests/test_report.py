"""The experiment report (projects.evaluation.report, `madseg report`) rendered from synthetic results."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ml_backend.atomic import atomic_write_json
from ml_backend.errors import MadsegError
from ml_backend.imageio import write_mask
from projects.cli import main
from projects.evaluation.report import (
    RESULTS_FILE,
    SECTION_IDS,
    count_failures,
    load_results,
    overlay,
    render_report,
    stage_times,
    validate_results,
)
from projects.overlay import blend
from projects.state import RoundState


def _photo(path: Path, seed: int, size: tuple[int, int] = (96, 72)) -> None:
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 * seed % 255)], -1)
    rgb = np.clip(rgb + rng.integers(0, 30, rgb.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _mask(path: Path, cls: int, size: tuple[int, int] = (48, 36), shift: int = 0) -> None:
    w, h = size
    m = np.zeros((h, w), np.uint8)
    m[8 + shift : 28, 10 + shift : 34] = cls
    m[0:3, :] = 255
    write_mask(path, m)


def _results(exp: Path) -> dict[str, Any]:
    """A synthetic experiment: 2 rounds, 3 competitors, T(0..2), baseline, SRCC, three galleries."""
    items = []
    for j, (cls, comp_cls) in enumerate([(15, 12), (8, 8), (3, 0)]):
        _photo(exp / "round-1" / "images" / f"img{j}.jpg", j)
        _mask(exp / "round-1" / "pred" / f"img{j}.png", cls)  # working-resolution maps (half size)
        _mask(exp / "round-1" / "pred-comp" / f"img{j}.png", comp_cls, shift=4)
        items.append(
            {
                "image": f"round-1/images/img{j}.jpg",
                "image_id": f"id{j}",
                "caption": f"id{j}: selected by dicenet / {['person', 'cat', 'bird'][j]} (d = 0.{8 - j})",
                "panels": [
                    {"title": "photo", "mask": None},
                    {"title": "target f(0)", "mask": f"round-1/pred/img{j}.png", "note": f"MOS {1 + j}.3"},
                    {"title": "dicenet-s1.75", "mask": f"round-1/pred-comp/img{j}.png"},
                ],
            }
        )
    t_names = ["T(0)", "T(1)", "T(2)"]
    rows = [
        {
            "key": "f(0)",
            "label": "f(0) espnetv2-s2.0",
            "role": "target",
            "round": 0,
            "version": "espnetv2@aa11",
            "miou": {"T(0)": 0.612, "T(1)": 0.301, "T(2)": 0.355},
            "gt_miou": {"T(0)": 0.634, "T(1)": 0.312, "T(2)": 0.371},
            "drawn_against": {"T(1)": True},
            "gate": {"status": "start", "reasons": ["the configured target"]},
        },
        {
            "key": "f(1)",
            "label": "f(1)",
            "role": "target",
            "round": 1,
            "version": "espnetv2@bb22",
            "miou": {"T(0)": 0.598, "T(1)": 0.421, "T(2)": 0.287},
            "drawn_against": {"T(2)": True},
            "gate": {"status": "promoted", "reasons": ["T(0): ok"]},
        },
        {
            "key": "f(2)",
            "label": "f(2)",
            "role": "target",
            "round": 2,
            "version": "espnetv2@cc33",
            "miou": {"T(0)": 0.605, "T(1)": 0.44, "T(2)": 0.402},
            "gate": {"status": "rejected", "reasons": ["T(0): forgetting, gt-class mIoU 0.63 -> 0.60"]},
        },
        {"key": "dicenet-s1.75", "role": "competitor", "miou": {"T(0)": 0.55, "T(1)": 0.39, "T(2)": 0.41}},
        {"key": "deeplabv3-mnv2", "role": "competitor", "miou": {"T(0)": 0.71, "T(1)": 0.52, "T(2)": None}},
    ]
    srcc = {
        n: {
            "models": [r["key"] for r in rows],
            "ks": list(range(1, 11)),
            "srcc": [None, 0.2, 0.5, 0.4, 0.7, 0.9, 0.9, 1.0, 1.0, 1.0][:10],
        }
        for n in t_names[1:]
    }
    failures = count_failures(
        {"id0": ["person", "dog"], "id1": ["cat"], "id2": ["bird"], "id3": ["person"]},
        {"round 1 candidates": ["id0", "id1", "id2", "id3"], "round 1 low-rated": ["id0", "id3"]},
    )
    return {
        "experiment": "synthetic <demo>",
        "settings": {
            "target": "espnetv2-s2.0",
            "competitors": "dicenet-s1.75, deeplabv3-mnv2",
            "n3": 2,
            "n4": 10,
        },
        "rounds": [
            {"round": 1, "|M|": 57, "|S|": 10, "|T|": 30, "new version": "espnetv2@bb22"},
            {"round": 2, "|M|": 49, "|S|": 10, "|T|": 30, "new version": "espnetv2@cc33"},
        ],
        "table1": {
            "columns": [{"name": n, "size": 30 if i else 7, "drawn_round": i} for i, n in enumerate(t_names)],
            "rows": rows,
        },
        "failures": failures,
        "help": {
            "reference": "f(0)", "served": "f(1)", "confidence": 0.95, "failure_zone": ["T(1)", "T(2)"],
            "gates": {"f(1)": {"status": "promoted"}, "f(2)": {"status": "rejected"}},
            "rows": [
                {"model": "f(1)", "served": True, "images": 50, "reference_gt_miou": 0.33, "gt_miou": 0.387,
                 "gain": 0.057, "ci": [0.012, 0.101], "gain_miou": 0.04, "t0_gain": -0.004,
                 "excluded_training_images": 0, "sets": ["T(1) (30)", "T(2) (20)"]},
                {"model": "f(2)", "served": False, "images": 40, "reference_gt_miou": 0.33, "gt_miou": 0.30,
                 "gain": -0.03, "ci": [-0.07, 0.01], "gain_miou": -0.02, "t0_gain": -0.03,
                 "excluded_training_images": 10},
            ],
            "effort": {"total": {"ratings": 135, "masks": 40, "lead_time_s": 1830.0}, "simulated": False,
                       "rounds": [{"round": 1, "ratings": 90, "masks": 20}, {"round": 2, "ratings": 45,
                                                                            "masks": 20}]},
        },
        "baseline": {
            "test_set": "T_MAD(f_MAD vs f_entropy)",
            "budget": 10,
            "columns": ["mIoU on T_MAD", "mIoU on T(0)"],
            "rows": [
                {
                    "method": "MAD",
                    "model": "f_MAD(1)",
                    "values": {"mIoU on T_MAD": 0.47, "mIoU on T(0)": 0.6},
                },
                {
                    "method": "entropy",
                    "model": "f_entropy",
                    "values": {"mIoU on T_MAD": 0.39, "mIoU on T(0)": 0.61},
                },
            ],
        },
        "srcc": srcc,
        "stages": [{"where": "round-1", "stage": "score", "seconds": 81.5},
                   {"where": "round-1", "stage": "finetune", "seconds": 140.25}],
        "galleries": {
            "candidates": items,
            "lowest_rated": [dict(items[0], panels=items[0]["panels"][:2])],
            "before_after": [
                {
                    "image": items[1]["image"],
                    "caption": "T(1) image",
                    "panels": [
                        {"title": "ground truth", "mask": "round-1/pred/img1.png"},
                        {"title": "f(0)", "mask": "round-1/pred-comp/img1.png"},
                        {"title": "f(1)", "mask": "round-1/pred/img1.png"},
                    ],
                }
            ],
        },
    }


def test_render_every_section_self_contained(tmp_path: Path) -> None:
    results = _results(tmp_path)
    files = render_report(results, tmp_path)
    page = files.html.read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page, sid
    for g in ("candidates", "lowest_rated", "before_after"):
        assert f'id="gallery-{g}"' in page
    assert 'class="missing"' not in page  # every section has data
    # self-contained: no external resources of any kind
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<link" not in page and "<script" not in page
    # 3 candidates x 3 panels + 1 x 2 + 1 x 3 thumbnails + 2 plots (failures, SRCC)
    assert page.count("data:image/png;base64,") == 9 + 2 + 3 + 2
    # Table 1: x100, best per column, rank, the "drawn against" mark, missing value
    assert "61.2" in page and "30.1†" in page and '<td class="best">71.0' in page and "–" in page
    assert "synthetic &lt;demo&gt;" in page  # escaped
    # the gate's verdicts and the ground-truth-class mIoU in Table 1; the rejected reason is shown
    assert '<span class="gate promoted"' in page and '<span class="gate rejected"' in page
    assert "T(0): forgetting, gt-class mIoU 0.63 -&gt; 0.60" in page and "gt 63.4" in page
    # "did the round help?": the served model's gain with its interval, and the human effort
    assert "Served model f(1): +5.7 points" in page and "95% interval +1.2 to +10.1" in page
    assert "+1.2 .. +10.1" in page and "-7.0 .. +1.0" in page
    assert "135 ratings, 40 masks; 30.5 min of annotation time" in page
    # legend names the classes drawn in the galleries
    for name in ("person", "cat", "bird", "ignore", "dog"):
        assert f"</span>{name}</span>" in page, name
    numbers = json.loads(files.json.read_text())
    assert numbers["table1"]["rows"][0]["miou"]["T(0)"] == 0.612
    assert numbers["failures"]["counts"]["person"] == {"round 1 candidates": 2, "round 1 low-rated": 2}
    assert numbers["srcc"]["T(1)"]["srcc"][0] is None
    assert numbers["warnings"] == []
    assert numbers["help"]["rows"][0]["ci"] == [0.012, 0.101]


def test_missing_parts_render_as_notes_and_missing_files_as_warnings(tmp_path: Path) -> None:
    files = render_report({"experiment": "empty"}, tmp_path)
    page = files.html.read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page
    assert page.count('class="missing"') >= 6
    results = _results(tmp_path)
    results["galleries"]["candidates"][0]["panels"][1]["mask"] = "round-1/pred/nope.png"
    results["galleries"]["lowest_rated"][0]["image"] = "round-1/images/gone.jpg"
    files = render_report(results, tmp_path)
    warnings = json.loads(files.json.read_text())["warnings"]
    assert any("nope.png" in w for w in warnings) and any("gone.jpg" in w for w in warnings)
    assert '<section id="warnings">' in files.html.read_text()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"experiment": 3}, "'experiment' must be the experiment name"),
        ({"table1": {"rows": []}}, "'table1' must have 'columns' and 'rows'"),
        (
            {"table1": {"columns": [{"name": "T(0)"}], "rows": [{"key": "a", "miou": {"T(0)": "high"}}]}},
            r"table1.rows\[0\].miou must map test-set names to numbers",
        ),
        ({"srcc": {"T(1)": {"ks": [1, 2], "srcc": [1.0]}}}, "equally long 'ks' and 'srcc'"),
        ({"galleries": {"candidates": [{"panels": []}]}}, r"galleries\['candidates'\]\[0\] needs an 'image'"),
        ({"help": {"rows": [{"model": "f(1)", "gain": 0.1, "ci": [0.1]}]}}, r"help.rows\[0\] needs"),
        ({"help": {"rows": "f(1)"}}, "'help' must have a 'rows' list"),
    ],
)
def test_bad_results_are_named(tmp_path: Path, patch: dict[str, Any], message: str) -> None:
    with pytest.raises(MadsegError, match=message):
        validate_results({"experiment": "x", **patch}, tmp_path, source="results.json")


def test_overlay_blends_foreground_and_resizes() -> None:
    """The report draws with the raters' overlay look (projects.overlay.blend): one picture for
    Label Studio and the report (issue 10), so background and ignore leave the photo as it is."""
    img = np.full((4, 6, 3), 100, np.uint8)
    mask = np.array([[0, 15], [255, 0]], np.uint8)  # resized x3 / x2
    out = overlay(img, mask, alpha=1.0)
    assert out.shape == (4, 6, 3)
    assert tuple(out[0, 0]) == (100, 100, 100)  # background: the photo
    assert tuple(out[0, 5]) == (192, 128, 128)  # person colour
    assert tuple(out[3, 0]) == (100, 100, 100)  # ignore: the photo
    np.testing.assert_array_equal(overlay(img, mask), blend(img, mask))  # the same look as the raters'
    assert overlay(img, None) is img


def test_madseg_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp"
    assert main(["report", "--experiment", str(exp)]) == 2
    assert "experiment dir does not exist" in capsys.readouterr().err
    exp.mkdir()
    assert main(["report", "--experiment", str(exp)]) == 2
    assert "results.json: no results yet" in capsys.readouterr().err
    (exp / RESULTS_FILE).write_text("{broken")
    assert main(["report", "--experiment", str(exp)]) == 2
    assert "unreadable results" in capsys.readouterr().err
    results = _results(exp)
    del results["stages"]  # the CLI fills them in from the state files
    atomic_write_json(exp / RESULTS_FILE, results)
    st = RoundState.load(exp, 1)
    st.mark("score", images=3)
    st.mark("select")
    RoundState.load(exp / "baseline-entropy", 1).mark("finetune")
    assert load_results(exp / RESULTS_FILE)["experiment"] == "synthetic <demo>"
    assert main(["report", "--experiment", str(exp), "--max-gallery", "2"]) == 0
    out = capsys.readouterr().out
    assert str((exp / "report" / "report.html").resolve()) in out
    page = (exp / "report" / "report.html").read_text()
    assert "Showing 2 of 3." in page
    numbers = json.loads((exp / "report" / "report.json").read_text())
    assert [(s["where"], s["stage"]) for s in numbers["stages"]] == [
        ("round-1", "score"),
        ("round-1", "select"),
        ("baseline-entropy/round-1", "finetune"),
    ]
    assert stage_times(exp)[0]["seconds"] >= 0
