"""bench/summary.py: the shared result format and the one table rendered from it."""
from __future__ import annotations

import json

import pytest

from bench.summary import BENCHMARKS, render, write_result


def test_write_result_and_render(tmp_path):
    path = write_result("peers", [
        {"metric": "speed-up vs TRL to the same accuracy", "value": 0.4567, "unit": "x", "goal": ">= 2", "met": False},
        {"metric": "pipeline peak RSS", "value": 1234.6, "unit": "MiB", "goal": "", "met": None},
    ], tmp_path)
    document = json.loads(path.read_text())
    assert document["benchmark"] == "peers" and document["command"] == "make bench-peers"
    assert set(document) == {"benchmark", "command", "date", "machine", "rows"} and "cores" in document["machine"]
    text = render(tmp_path)
    assert "| 0.457 | x | >= 2 | **no** |" in text
    assert "| pipeline peak RSS | 1,235 | MiB |" in text
    for name in set(BENCHMARKS) - {"peers"}:
        assert f"| {name} | not run (`make bench-{name}`) |" in text


def test_unknown_benchmark_listed_after_the_known_ones(tmp_path):
    (tmp_path / "extra.json").write_text(json.dumps({"benchmark": "extra", "date": "2026-01-01", "machine": "m",
                                                     "rows": [{"metric": "m", "value": 1, "unit": "", "goal": "",
                                                               "met": True}]}))
    lines = render(tmp_path).splitlines()
    assert lines.index(next(line for line in lines if line.startswith("| [extra]"))) > \
        lines.index(next(line for line in lines if line.startswith("| peers |")))


def test_rows_missing_a_field_are_refused(tmp_path):
    with pytest.raises(ValueError, match="met"):
        write_result("x", [{"metric": "m", "value": 1.0, "unit": "s", "goal": ""}], tmp_path)
