"""Tests for evaluate_movie_review.py --compare (tables, chart, different test sets) and its one-line number errors."""

from __future__ import annotations

import json

import pytest

import evaluate_movie_review as ev
from review_lm.evaluation import metrics


# --------------------------------------------------------------------------------------------------------------
# --compare
# --------------------------------------------------------------------------------------------------------------
def _metrics(model: dict | None, digest: str = "same") -> dict:
    keys = [k for k, _ in metrics.METRICS]
    return {
        "model": None if model is None else dict(zip(keys, model["values"], strict=True)),
        "baselines": {"last": dict(zip(keys, [1.5, 10, 20, 3, 15, 70, 95, 40], strict=True)),
                      "random": dict(zip(keys, [1, 9, 18, 2, 14, 72, 96, 35.25], strict=True))},
        "references": {"distinct_1": 68.123, "distinct_2": 97, "avg_length": 42.0},
        "references_sha256": digest,
    }


def test_compare_prints_table_and_writes_chart(tmp_path, capsys):
    from PIL import Image

    full = tmp_path / "exp1_full" / "eval"
    full.mkdir(parents=True)
    (full / "metrics.json").write_text(json.dumps(_metrics({"values": [12.345, 30, 40.5, 20, 35, 60, 90, 38.26]})))
    bare = tmp_path / "exp4_baseline" / "eval"
    bare.mkdir(parents=True)
    (bare / "metrics.json").write_text(json.dumps(_metrics({"values": [2, 15.556, 25, 5, 20, 50, 80.004, 20]})))
    png = tmp_path / "chart.png"
    # A run folder, and an eval folder: both name the run after the folder holding eval/.
    assert ev.main(["--compare", str(tmp_path / "exp1_full"), str(bare), "--compare_out", str(png)]) == 0
    out = capsys.readouterr()
    table = out.out.split("\n\n")[0].splitlines()
    assert table == [
        "| run | BLEU | chrF | ROUGE-1 | ROUGE-2 | ROUGE-L | distinct-1 | distinct-2 | avg length |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| exp1_full | 12.35 | 30.00 | 40.50 | 20.00 | 35.00 | 60.00 | 90.00 | 38.3 |",
        "| exp4_baseline | 2.00 | 15.56 | 25.00 | 5.00 | 20.00 | 50.00 | 80.00 | 20.0 |",
        "| baseline: last | 1.50 | 10.00 | 20.00 | 3.00 | 15.00 | 70.00 | 95.00 | 40.0 |",
        "| baseline: random | 1.00 | 9.00 | 18.00 | 2.00 | 14.00 | 72.00 | 96.00 | 35.2 |",
        "| reference | - | - | - | - | - | 68.12 | 97.00 | 42.0 |",
    ]
    assert str(png) in out.out and out.err == ""
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_compare_warns_about_different_test_sets(tmp_path, capsys):
    paths = []
    for name, digest in (("a", "x"), ("b", "y")):
        path = tmp_path / name / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps(_metrics(None, digest)))
        paths.append(str(path))
    assert ev.main(["--compare", *paths, "--compare_out", str(tmp_path / "c.png")]) == 0
    assert "different test sets" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1, got 0"),
    (["--do_sample", "--temperature", "0"], "--temperature must be > 0, got 0"),
    (["--do_sample", "--top_p", "1.5"], "--top_p must be > 0 and <= 1, got 1.5"),
    (["--top_k", "-1"], "--top_k must be >= 0, got -1"),
    (["--batch_size", "x"], "argument --batch_size: invalid int value: 'x'"),
])
def test_bad_numbers_are_one_line_and_write_nothing(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--model_dir", str(tmp_path / "run"), *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []
