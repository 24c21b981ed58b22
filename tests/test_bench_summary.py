"""bench/summary.py: the one table rendered from every benchmark's bench/results/<name>.json."""
from __future__ import annotations

import json

from bench.summary import BENCHMARKS, render


def write(folder, name: str, rows: list[dict]) -> None:
    (folder / f"{name}.json").write_text(json.dumps({"benchmark": name, "command": f"make bench-{name}",
                                                     "date": "2026-01-02", "machine": "2 x CPU, 24 GiB",
                                                     "rows": rows}))


def test_rows_and_benchmarks_not_run(tmp_path):
    write(tmp_path, "peers", [
        {"metric": "speed-up vs TRL to the same accuracy", "value": 0.4567, "unit": "x", "goal": ">= 2", "met": False},
        {"metric": "pipeline peak RSS", "value": 1234.6, "unit": "MiB", "goal": "", "met": None},
    ])
    text = render(tmp_path)
    assert "| [peers](../bench/results/peers.json) | speed-up vs TRL to the same accuracy | 0.457 | x | >= 2 | **no** " \
           "| 2026-01-02 | 2 x CPU, 24 GiB |" in text
    assert "| pipeline peak RSS | 1,235 | MiB |" in text
    for name in set(BENCHMARKS) - {"peers"}:
        assert f"| {name} | not run (`make bench-{name}`) |" in text


def test_unknown_benchmark_listed_after_the_known_ones(tmp_path):
    write(tmp_path, "extra", [{"metric": "m", "value": 1, "unit": "", "goal": "", "met": True}])
    lines = render(tmp_path).splitlines()
    extra = next(k for k, line in enumerate(lines) if line.startswith("| [extra]"))
    peers = next(k for k, line in enumerate(lines) if line.startswith("| peers |"))
    assert extra > peers and "| yes |" in lines[extra]


def test_the_committed_results_render(tmp_path):
    # Every file in bench/results/ (written by bench/record.py) must render.
    from bench.record import RESULTS

    text = render(RESULTS)
    for path in RESULTS.glob("*.json"):
        assert f"[{json.loads(path.read_text())['benchmark']}]" in text
