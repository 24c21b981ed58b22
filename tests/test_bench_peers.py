"""bench-peers' figures over seeds: mean curves with their spread, the area under the curve per
sample, and the speed-up read on the mean curves (not where one noisy seed crosses first)."""
import pytest

from bench.peers.evaluation import standard_error
from bench.peers.report import area_per_sample, mean_curve, result_rows, summarise

PHASE = {"seconds": 1.0, "tokens": 100, "stage_s": 1.5}


def run(system: str, seed: int, accuracies: list[float], seconds_per_iteration: float) -> dict:
    checkpoints = [{"version": v, "samples": 256 * v, "seconds": v * seconds_per_iteration, "path": f"{system}/{seed}/{v}",
                    "accuracy": a} for v, a in enumerate(accuracies)]
    return {"system": system, "seed": seed, "checkpoints": checkpoints, "command": f"run {system}",
            "per_iteration": [{"generate": PHASE, "teacher": PHASE, "train": PHASE}] * (len(accuracies) - 1),
            "wall_s": 30.0, "cpu_s": 60.0, "load_mean": 1.0, "peak_rss_largest_process_mib": 100.0,
            "peak_rss_tree_mib": 200.0, "time_capped": False}


def test_the_mean_curve_averages_each_checkpoint_over_the_seeds_with_its_spread():
    curve = mean_curve([run("a", 0, [0.2, 0.4, 0.6], 10), run("a", 1, [0.2, 0.6, 0.8], 12)])
    assert [p["accuracy"] for p in curve] == pytest.approx([0.2, 0.5, 0.7])
    assert [p["spread"] for p in curve] == pytest.approx([0.0, 0.1414213562, 0.1414213562])
    assert [p["seconds"] for p in curve] == pytest.approx([0.0, 11.0, 22.0])
    # (256 x (0.2 + 0.5) / 2 + 256 x (0.5 + 0.7) / 2) / 512, by hand
    assert area_per_sample(curve) == pytest.approx(0.475)


def test_the_speed_up_is_read_on_the_mean_curves_not_on_one_seed():
    """Seed 0 of `ours` crosses TRL's best (0.6) one checkpoint early; the mean curve does not, so the
    speed-up compares both systems at their second checkpoint: 10 s against 10 s."""
    runs = [run("ours", 0, [0.2, 0.65, 0.7], 5), run("ours", 1, [0.2, 0.35, 0.7], 5),
            run("trl", 0, [0.2, 0.4, 0.6], 5), run("trl", 1, [0.2, 0.4, 0.6], 5),
            run("trl-vllm", 0, [0.2, 0.3, 0.6], 4), run("trl-vllm", 1, [0.2, 0.3, 0.6], 4)]
    summary = summarise(runs, teacher=1.0, default="ours", eval_prompts=2500)
    pair = summary["speedups"]["ours vs trl"]
    assert (pair["accuracy"], pair["seconds"], pair["peer_seconds"], pair["speedup"]) == pytest.approx((0.6, 10, 10, 1))
    assert pair["area_ratio"] == pytest.approx(((0.2 + 0.5) / 2 + (0.5 + 0.7) / 2) / ((0.2 + 0.4) / 2 + (0.4 + 0.6) / 2))
    assert pair["outside_spread"] == 1  # at 512 samples 0.7 against 0.6 with TRL's spread 0 and ours 0
    assert summary["seeds"] == [0, 1] and summary["standard_error"] == pytest.approx(0.01)
    rows = [r["metric"] for r in result_rows(summary)]
    assert sum(m.startswith("speed-up to the same accuracy") for m in rows) == 1  # one per system, against TRL
    assert not any("trl-vllm" in m for m in rows if m.startswith("speed-up"))


def test_2500_prompts_bound_the_standard_error_of_an_accuracy_by_001():
    assert standard_error(0.5, 2500) == pytest.approx(0.01) and standard_error(0.8, 2500) < 0.01
    assert standard_error(0.5, 500) > 0.02  # the tiny eval split alone: the issue's ~0.02


def test_the_report_shows_the_mean_and_spread_of_each_checkpoint():
    from bench.peers.report import render_markdown
    runs = [run("ours", 0, [0.2, 0.65, 0.7], 5), run("ours", 1, [0.2, 0.35, 0.7], 5),
            run("trl", 0, [0.2, 0.4, 0.6], 5), run("trl", 1, [0.2, 0.4, 0.6], 5)]
    text = render_markdown(runs, summarise(runs, 1.0, "ours", 2500), "python -m bench.peers --seeds 2", 2)
    assert "| 256 | 0.500 ± 0.212 | 5 s | 0.400 ± 0.000 | 5 s |" in text
    assert "seeds: [0, 1]" in text and "2500 eval prompts" in text
