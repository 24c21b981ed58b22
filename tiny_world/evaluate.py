"""`make tiny-eval`: teacher and student accuracy on the whole eval split, greedy and sampled.

Prints one line:
    tiny-eval teacher_greedy=<acc> teacher_sampled=<acc> student_greedy=<acc> student_sampled=<acc>

Every figure comes from the loop's own evaluator (stages/generate/jobs.py: evaluate_engine) with the
tiny config's eval settings, only the temperature and the set changed: the numbers `make iterate`
logs as eval.accuracy are the same function of the same checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.config import load_config
from common.libraries import quiet_libraries
from stages.generate.hf_engine import HfEngine
from stages.generate.jobs import evaluate_engine

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
CACHE = Path("runs") / "tiny-eval"  # rendered prompt sets, reused between calls


def accuracy(model_dir: Path, eval_path: Path, temperature: float, seed: int = 0, max_new_tokens: int = 64) -> dict:
    """Accuracy (and boxed fraction) of a model folder on a DAPO-schema eval parquet, one sample per prompt."""
    config = load_config(CONFIG, [f"eval.sets=[{eval_path}]", "eval.prompts=0", "eval.k=1", f"seed={seed}",
                                  f"eval.temperature={temperature}", "eval.top_p=1.0",
                                  f"eval.max_response_tokens={max_new_tokens}", "data.max_prompt_tokens=1024"])
    CACHE.mkdir(parents=True, exist_ok=True)
    engine = HfEngine(model_dir)
    metrics = evaluate_engine(config, CACHE, engine)
    name = next(key.split("/")[1] for key in metrics if key.count("/") == 2)
    return {"accuracy": metrics["eval/accuracy"], "boxed": metrics[f"eval/{name}/boxed_fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=Path("assets/tiny"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_libraries()
    eval_path = args.assets / "data" / "eval.parquet"
    results, boxed = {}, {}
    for model in ("teacher", "student"):
        for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            figures = accuracy(args.assets / model, eval_path, temperature, args.seed)
            results[f"{model}_{mode}"], boxed[f"{model}_{mode}"] = figures["accuracy"], figures["boxed"]
    print("tiny-eval " + " ".join(f"{k}={v:.3f}" for k, v in results.items()))
    print("boxed    " + " ".join(f"{k}={v:.3f}" for k, v in boxed.items()))


if __name__ == "__main__":
    main()
