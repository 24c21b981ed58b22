"""DAPO-Math-17k's prompt lengths in Qwen3 tokens, as the pipeline would render them.

The card caps prompts at 1024 tokens; how many DAPO prompts that cap drops had only ever been
guessed with the tiny tokenizer. This ingests both templates through the project's own
`common.data.load_prompts` (chat template with enable_thinking=False, as the card's recipe) with the
rebuilt Qwen3 tokenizer and no length cap, then counts.

    python -m rehearsal.prompt_lengths [--data ../shared/data] [--out rehearsal/results/dapo_prompt_lengths.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from common.data import load_prompts
from common.errors import ConfigError
from common.modeling import load_tokenizer
from common.shards import file_sha256
from rehearsal.tokenizer import BuildError, ensure_tokenizer

TEMPLATES = {"boxed": "dapo-math-17k-boxed-template.parquet", "answer": "dapo-math-17k-answer-template.parquet"}
CARD_MAX_PROMPT_TOKENS = 1024
NO_CAP = 10**9  # large enough that load_prompts drops nothing for length: every prompt is counted
PERCENTILES = (10, 50, 90, 99)


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it.

    Always one of the values (a token count, never an interpolated 512.5), and easy to check by hand.
    """
    if not sorted_values:
        raise ValueError("no values")
    return sorted_values[max(1, math.ceil(p / 100 * len(sorted_values))) - 1]


def summarize(lengths: list[int], cap: int = CARD_MAX_PROMPT_TOKENS) -> dict[str, int]:
    """min, the percentiles, max, and how many prompts exceed `cap`."""
    ordered = sorted(lengths)
    summary = {"min": ordered[0]}
    summary.update({f"p{p}": percentile(ordered, p) for p in PERCENTILES})
    summary.update({"max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 1),
                    f"over_{cap}": sum(1 for n in ordered if n > cap)})
    return summary


def measure(path: Path, tokenizer, enable_thinking: bool = False) -> dict:
    """One template's figures: rows in the file, rows kept, rows dropped by reason, token statistics."""
    import pyarrow.parquet as pq

    started = time.perf_counter()
    prompt_set = load_prompts(path, tokenizer, max_prompt_tokens=NO_CAP, enable_thinking=enable_thinking)
    render_seconds = time.perf_counter() - started  # what a run's start pays for this set, once
    lengths = [len(p.prompt_ids) for p in prompt_set.prompts]
    return {"file": Path(path).name, "sha256": file_sha256(path), "rows": pq.read_metadata(path).num_rows,
            "kept": len(lengths), "dropped": prompt_set.dropped, "prompt_tokens": summarize(lengths),
            "render_seconds": round(render_seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rehearsal.prompt_lengths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder of the DAPO parquet files")
    parser.add_argument("--tokenizer", type=Path, default=Path("assets/qwen3-tokenizer"),
                        help="Qwen3 tokenizer folder (built if absent)")
    parser.add_argument("--out", type=Path, default=Path("rehearsal/results/dapo_prompt_lengths.json"))
    args = parser.parse_args(argv)
    missing = [file for file in TEMPLATES.values() if not (args.data / file).is_file()]
    if missing:
        print(f"error: {args.data} lacks {', '.join(missing)} (fix: pass --data with the folder that holds them)",
              file=sys.stderr)
        return 1
    try:
        folder = ensure_tokenizer(args.tokenizer)
        tokenizer = load_tokenizer(folder)
        results = {}
        start = time.perf_counter()
        for name, file in TEMPLATES.items():
            results[name] = measure(args.data / file, tokenizer)
    except BuildError as error:
        print(error, file=sys.stderr)
        return 1
    except ConfigError as error:  # a file that is not DAPO-schema parquet
        print(f"error: {error} (fix: point --data at the DAPO-Math-17k parquet files)", file=sys.stderr)
        return 1
    report = {"tokenizer": str(args.tokenizer), "tokenizer_json_sha256": file_sha256(folder / "tokenizer.json"),
              "enable_thinking": False, "max_prompt_tokens": NO_CAP, "card_max_prompt_tokens": CARD_MAX_PROMPT_TOKENS,
              "percentiles": "nearest rank", "templates": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        t = r["prompt_tokens"]
        print(f"{name}: {r['rows']:,} rows, {r['kept']:,} kept, dropped {r['dropped']} | prompt tokens "
              f"min {t['min']} p10 {t['p10']} p50 {t['p50']} p90 {t['p90']} p99 {t['p99']} max {t['max']} "
              f"| over {CARD_MAX_PROMPT_TOKENS}: {t[f'over_{CARD_MAX_PROMPT_TOKENS}']} | rendered in {r['render_seconds']} s")
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
