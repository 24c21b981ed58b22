"""`make tiny-eval`: teacher and student accuracy on the whole eval split, greedy and sampled.

Prints one line:
    tiny-eval teacher_greedy=<acc> teacher_sampled=<acc> student_greedy=<acc> student_sampled=<acc>
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.data import load_prompts
from common.modeling import load_model, load_tokenizer
from stages.score.verifier import grade_batch
from common.run import quiet_libraries
from stages.generate.hf_engine import sample
from stages.generate.sampling import SamplingParams


def accuracy(model_dir: Path, eval_path: Path, temperature: float, seed: int = 0, max_new_tokens: int = 64) -> dict:
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    prompts = load_prompts(eval_path, tokenizer, max_prompt_tokens=1024, enable_thinking=False).prompts
    params = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    samples = sample(model, [p.prompt_ids for p in prompts], params, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    grades = grade_batch([(tokenizer.decode(s.response_ids, skip_special_tokens=True), prompts[s.prompt_index].ground_truth)
                          for s in samples])
    return {"accuracy": sum(g.correct for g in grades) / len(grades),
            "boxed": sum(g.status != "no_answer" for g in grades) / len(grades)}


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
