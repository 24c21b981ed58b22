"""`make gpu-check`: the pipeline's own stages at the card's shapes on one GPU, in under 10 minutes.

    python -m bench.gpu_check [--cpu] [--out runs/gpu-check] [--budget-s 560] [--only CHECK]

Prepared for the minutes a lent GPU machine gives: it needs nothing from the network (what the GPU
image lacks travels as wheels, `make gpu-wheels`), runs each check in a process of its own under its
own time limit (a crash, an OOM or a hang costs that check only), prints one JSON line per check and
writes them all to <out>/gpu-check.jsonl. In priority order:

  preflight     GPU, driver, torch/CUDA, nvcc, free memory and disk, the bf16 matmul ceiling
  train_zero3   the train stage's engine (stages/train) at Qwen3-1.7B's full shape, random weights, bf16,
                ZeRO-3 with the card's parameter and optimizer offload, gradient checkpointing, packing,
                8192-token micro-batches, one 16-row mini-batch: s/step, tokens/s, MFU (8N), peak memory;
                then the weight export and the gate: v1 exported, an engine loads it and passes the gate,
                an engine left at v0 is caught (both timed)
  accumulation  tests/accumulation_probe.py on CUDA (NCCL, one rank): a mini-batch's gradient as several
                micro-batches against one, ZeRO-3 + offload + checkpointing + packing + bf16
  train_zero1   the same mini-batch under ZeRO-1 without offload, for comparison
  packed        the teacher's forward at Qwen3-4B's shape on 8 rows of ~7k tokens: the attention the
                pipeline picks for packed rows (common/attention.py) against a padded batch
  generate      the HF engine at the card's lengths (8,192 tokens a sequence) within its KV budget:
                the batch the budget gives, tokens/s over the first minute, peak memory
  stages        two iterations of the card's config through the stage CLIs (python -m stages.*) at the
                real shapes with 64-token responses, then `python -m orchestrator check`

`--cpu` runs every check's code path at small shapes on this machine (gloo instead of NCCL): the
slow suite runs it (tests/test_gpu_check.py), so the GPU run only meets the GPU. MFU counts 2N FLOPs
per token forward and 8N per training token with gradient checkpointing (N with the embeddings,
attention not counted), against the bf16 matmul rate the preflight measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN3_VOCAB = 151_936
RESULTS = "gpu-check.jsonl"


@dataclass(frozen=True)
class Scale:
    """The shapes and lengths of one mode: the card's on a GPU, small ones on a CPU."""
    student: dict
    teacher: dict
    rows: int              # the train check's mini-batch
    response: int          # its responses' tokens (prompt 120)
    micro_tokens: int      # train.max_tokens_per_micro_batch
    packed_rows: int
    packed_tokens: int     # per row, prompt + response
    generate_seconds: float
    stage_response: int    # the stage CLIs' responses


GPU = Scale(
    student=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    teacher=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128),
    rows=16, response=1900, micro_tokens=8192, packed_rows=8, packed_tokens=7168, generate_seconds=60.0,
    stage_response=64)
CPU = Scale(
    student=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    teacher=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24),
    rows=16, response=100, micro_tokens=1024, packed_rows=8, packed_tokens=700, generate_seconds=5.0,
    stage_response=16)

# (name, seconds it may take on a GPU / on a CPU), in priority order.
CHECKS = [("preflight", 60, 60), ("train_zero3", 200, 300), ("accumulation", 120, 300), ("train_zero1", 90, 200),
          ("packed", 90, 200), ("generate", 100, 120), ("stages", 240, 400)]


# ---- shared by the checks ---------------------------------------------------------------------

def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gpu_gib() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def matmul_peak(out: Path) -> float:
    """The preflight's bf16 matmul rate (FLOP/s), the MFU denominator (on a CPU: its fp32 rate)."""
    for line in (out / RESULTS).read_text().splitlines() if (out / RESULTS).exists() else []:
        result = json.loads(line)
        if result.get("check") == "preflight" and "matmul_tflops" in result:
            return result["matmul_tflops"] * 1e12
    return float("nan")


def tokenizer_for(vocab: int):
    """The tiny world's tokenizer padded with placeholder tokens to `vocab` (no Qwen3 download here):
    every id a random model samples decodes to something."""
    from common.modeling import load_tokenizer

    tokenizer = load_tokenizer(ROOT / "assets" / "tiny" / "student")
    tokenizer.add_tokens([f"<|check_{i}|>" for i in range(vocab - len(tokenizer))], special_tokens=True)
    return tokenizer


def ensure_models(out: Path, scale: Scale) -> dict[str, Path]:
    """Random-weight student and teacher of the scale's shapes with the padded tokenizer, built on the
    device (bf16 on a GPU) and saved once per --out."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folders = {role: out / "models" / role for role in ("student", "teacher")}
    if all((f / "model.safetensors").exists() for f in folders.values()):
        return folders
    tokenizer = tokenizer_for(QWEN3_VOCAB)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    for seed, (role, shape) in enumerate((("student", scale.student), ("teacher", scale.teacher))):
        torch.manual_seed(seed)
        config = Qwen3Config(vocab_size=QWEN3_VOCAB, max_position_embeddings=32768, rope_theta=1e6,
                             tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **shape)
        torch.set_default_dtype(dtype)
        with device():
            model = Qwen3ForCausalLM(config)
        torch.set_default_dtype(torch.float32)
        staging = folders[role].with_name(f".{role}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        del model
        shutil.rmtree(folders[role], ignore_errors=True)
        staging.rename(folders[role])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folders


def card_config(out: Path, scale: Scale, *extra: str):
    """The card's config on the check's models, with the scale's micro-batch budget."""
    from common.config import load_config

    models = ensure_models(out, scale)
    return load_config(ROOT / "configs" / "qwen3-1.7b-opd-dapo.yaml", [
        f"model.student={models['student']}", f"model.teacher={models['teacher']}", "train.processes=1",
        f"train.max_tokens_per_micro_batch={scale.micro_tokens}", "generate.engine=hf", *extra])


def mini_batch(scale: Scale, vocab: int = QWEN3_VOCAB):
    """16 rows of a 120-token prompt and a response, teacher log-probs in [-3, 0]: one mini-batch."""
    import torch

    from stages.train.iteration import IterationData

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (120,), generator=g).tolist() for _ in range(scale.rows)]
    responses = [torch.randint(10, vocab, (scale.response,), generator=g).tolist() for _ in range(scale.rows)]
    teacher = [-3 * torch.rand(scale.response, generator=g) for _ in range(scale.rows)]
    return IterationData(prompts, responses, teacher, [t.clone() for t in teacher])


def train_step(config, checkpoint: Path, scale: Scale, out: Path) -> tuple[dict, object]:
    """One k1 optimizer step of the card's train stage on one mini-batch, timed after a warm-up step.
    Returns the figures and the trainer (its engine holds the trained weights)."""
    from common.memory import peak_rss_gib, reset_peaks
    from stages.train.iteration import train_iteration
    from stages.train.stage import Trainer

    started = time.time()
    trainer = Trainer(config)
    engine = trainer.engine_at(checkpoint)
    tokenizer = trainer.tokenizer
    setup = time.time() - started
    data = mini_batch(scale)
    prompt_ids = [f"p{k}" for k in range(scale.rows)]
    config.train.mini_batch_prompts = config.generate.prompts_per_iteration = scale.rows
    times = []
    for step in range(2):  # the first compiles kernels (and CPU Adam's first step allocates its state)
        reset_peaks()
        synchronize()
        began = time.time()
        metrics = train_iteration(config, engine, data, prompt_ids, tokenizer.pad_token_id, seed=step, iteration=step)
        synchronize()
        times.append(time.time() - began)
    tokens = sum(map(len, data.prompts)) + sum(map(len, data.responses))
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    seconds = times[-1]
    result = {"seconds_per_step": round(seconds, 2), "setup_seconds": round(setup, 1), "sequence_tokens": tokens,
              "tokens_per_s": round(tokens / seconds), "micro_batches": metrics["train/micro_batches_per_step"],
              "mfu_8N": round(8 * n * tokens / seconds / matmul_peak(out), 3), "params": n,
              "peak_gpu_gib": peak_gpu_gib(), "peak_host_rss_gib": round(peak_rss_gib(), 1),
              "loss": round(metrics["train/loss"], 4), "grad_norm": round(metrics["train/grad_norm"], 3)}
    return result, trainer


# ---- the checks -----------------------------------------------------------------------------

def check_preflight(out: Path, scale: Scale) -> dict:
    import torch

    result = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device())}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        result.update(gpu=torch.cuda.get_device_name(), gpu_free_gib=round(free / 2**30, 1),
                      gpu_total_gib=round(total / 2**30, 1))
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        result["driver"] = smi.stdout.strip()
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if Path(nvcc).exists():
        result["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    result["disk_free_gib"] = round(shutil.disk_usage(out).free / 2**30, 1)
    size, dtype = (8192, torch.bfloat16) if torch.cuda.is_available() else (1024, torch.float32)
    a = torch.randn(size, size, device=device(), dtype=dtype)
    times = []
    for _ in range(8):
        synchronize()
        began = time.perf_counter()
        a @ a
        synchronize()
        times.append(time.perf_counter() - began)
    result["matmul_tflops"] = round(2 * size**3 / statistics.median(times[3:]) / 1e12, 2)
    for name in ("deepspeed", "transformers", "pyarrow"):
        try:
            result[name] = __import__(name).__version__
        except ImportError as error:
            result[name] = f"missing: {error}"
    return result


def check_train_zero3(out: Path, scale: Scale) -> list[dict]:
    """The card's ZeRO-3 + offload step, then v1's export and the weight-sync gate on it."""
    from common import shards
    from common.errors import WeightSyncError
    from stages.generate.gate import check_weight_sync
    from stages.generate.hf_engine import HfEngine
    from stages.train.stage import probe_sequences, write_policy

    config = card_config(out, scale)
    run = out / "run-gate"
    shutil.rmtree(run, ignore_errors=True)
    v0 = shards.checkpoint_dir(run, 0)
    shutil.copytree(config.model.student, v0)
    shards.seal_checkpoint(v0)
    result, trainer = train_step(config, v0, scale, out)
    train = {"check": "train_zero3", "zero_stage": 3, "offload": True, **result}
    print("RESULT " + json.dumps(train), flush=True)  # its own line even if the gate fails after it
    data = mini_batch(scale)
    columns = {"prompt_id": [f"p{k}" for k in range(scale.rows)], "sample_idx": [0] * scale.rows,
               "prompt_ids": data.prompts, "response_ids": data.responses}
    began = time.time()
    write_policy(trainer, shards.checkpoint_dir(run, 1), probe_sequences(columns))
    export_seconds = time.time() - began
    v1 = shards.checkpoint_dir(run, 1)
    trainer.close()
    began = time.time()
    fresh = HfEngine(v0)
    fresh.load_policy(v1)
    load_seconds = time.time() - began
    began = time.time()
    passed = check_weight_sync(fresh, v1)
    gate_seconds = time.time() - began
    fresh.checkpoint = v1
    fresh.load_policy(v0)  # an engine left at v0 while it says v1
    fresh.checkpoint = v1
    try:
        check_weight_sync(fresh, v1)
        caught = "not caught"
    except WeightSyncError as error:
        caught = str(error)[:160]
    return [{"check": "export_gate", "export_seconds": round(export_seconds, 1),
                    "load_in_place_seconds": round(load_seconds, 1), "gate_seconds": round(gate_seconds, 2),
                    "gap_mean": passed.get("generate/weight_sync_gap_mean"), "stale_engine": caught,
                    "ok": caught != "not caught"}]


def check_accumulation(out: Path, scale: Scale) -> dict:
    case = "3+offload+ckpt+pack" + ("+bf16" if device().type == "cuda" else "")
    report = out / "accumulation.json"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "accumulation_probe.py"), str(report), case],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    entry = json.loads(report.read_text())[case]
    return {"case": case, "single_gradient_error": entry["single"]["gradient_error"],
            "splits": {name: {k: v for k, v in split.items()} for name, split in entry["splits"].items()}}


def check_train_zero1(out: Path, scale: Scale) -> dict:
    from common import shards

    config = card_config(out, scale, "train.zero_stage=1", "train.offload_params=false",
                         "train.offload_optimizer=false")
    v0 = out / "run-zero1" / "checkpoints" / "v0000"
    shutil.rmtree(v0.parent.parent, ignore_errors=True)
    shutil.copytree(config.model.student, v0)
    shards.seal_checkpoint(v0)
    result, trainer = train_step(config, v0, scale, out)
    trainer.close()
    return {"zero_stage": 1, "offload": False, **result}


def check_packed(out: Path, scale: Scale) -> dict:
    import torch

    from common.attention import attention_implementation
    from common.memory import peak_rss_gib, reset_peaks
    from common.modeling import load_inference_model, response_logprobs

    teacher = load_inference_model(ensure_models(out, scale)["teacher"])
    n = sum(p.numel() for p in teacher.parameters())
    g = torch.Generator().manual_seed(0)
    step = scale.packed_tokens // 64
    lengths = [scale.packed_tokens - step * k for k in range(scale.packed_rows)]  # ~7k tokens, uneven
    prompts = [torch.randint(10, QWEN3_VOCAB, (120,), generator=g).tolist() for _ in lengths]
    responses = [torch.randint(10, QWEN3_VOCAB, (length - 120,), generator=g).tolist() for length in lengths]
    result = {"attention": attention_implementation(), "rows": len(lengths), "tokens": sum(lengths)}
    outputs = {}
    for packed in (True, False):
        name = "packed" if packed else "padded"
        with torch.no_grad():
            response_logprobs(teacher, prompts[:1], responses[:1], 0, chunk_tokens=4096, packed=packed)  # warm-up
            reset_peaks()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            synchronize()
            began = time.time()
            outputs[name] = response_logprobs(teacher, prompts, responses, 0, chunk_tokens=4096, packed=packed)
            synchronize()
        seconds = time.time() - began
        forward_tokens = sum(lengths) if packed else len(lengths) * max(lengths)
        result[name] = {"seconds": round(seconds, 2), "tokens_per_s": round(sum(lengths) / seconds),
                        "mfu_2N": round(2 * n * forward_tokens / seconds / matmul_peak(out), 3),
                        "peak_gpu_gib": peak_gpu_gib(), "peak_host_rss_gib": round(peak_rss_gib(), 1)}
    result["max_abs_diff"] = max((a.float() - b.float()).abs().max().item()
                                 for a, b in zip(outputs["packed"].sampled, outputs["padded"].sampled))
    return result


def check_generate(out: Path, scale: Scale) -> dict:
    import torch

    from common.memory import peak_rss_gib, reset_peaks
    from stages.generate.hf_engine import HfEngine, kv_batches, kv_bytes_per_token
    from stages.generate.sampling import SamplingParams

    config = card_config(out, scale)
    engine = HfEngine(ensure_models(out, scale)["student"], config.generate.kv_cache_gib)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, QWEN3_VOCAB, (1024,), generator=g).tolist() for _ in range(64)]
    max_new = config.generate.max_response_tokens  # the card's 7,168 after prompts of up to 1,024
    per_token = kv_bytes_per_token(engine.model.config, next(engine.model.parameters()).element_size())
    sizes = kv_batches([1024] * 256, max_new, per_token, engine.kv_budget, 256, 64 if torch.cuda.is_available() else 1)
    params = SamplingParams(n=4, max_new_tokens=max_new, seed=0, batch_size=sizes[0], max_seconds=scale.generate_seconds)
    reset_peaks()
    began = time.time()
    samples = engine.sample(prompts[: -(-sizes[0] // 4)], params)
    synchronize()
    seconds = time.time() - began
    tokens = sum(len(s.response_ids) for s in samples)
    return {"kv_budget_gib": round(engine.kv_budget / 2**30, 1), "kv_bytes_per_token": per_token,
            "batch": sizes[0], "batches_for_256": len(sizes), "sequence_tokens": 1024 + max_new,
            "new_tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds),
            "peak_gpu_gib": peak_gpu_gib(), "peak_host_rss_gib": round(peak_rss_gib(), 1)}


def check_stages(out: Path, scale: Scale) -> dict:
    """Two iterations through `python -m stages.*` (the card's config, the check's models, the tiny
    world's prompts, short responses, no eval), then `orchestrator check`."""
    from common.config import load_config
    from orchestrator.loop import prepare_run

    models = ensure_models(out, scale)
    run = out / "run-stages"
    shutil.rmtree(run, ignore_errors=True)
    overrides = [f"model.student={models['student']}", f"model.teacher={models['teacher']}", "train.processes=1",
                 "generate.engine=hf", "data.train=assets/tiny/data/train.parquet", "data.epochs=0",
                 f"generate.max_response_tokens={scale.stage_response}", "generate.max_model_len=0", "eval.every=0",
                 "generate.prompts_per_iteration=16", "train.mini_batch_prompts=4", "orchestrator.mode=subprocess"]
    prepare_run(run, load_config(ROOT / "configs" / "qwen3-1.7b-opd-dapo.yaml", overrides), force=False)
    seconds = {}
    for iteration in range(2):
        for stage in ("generate", "score", "train"):
            began = time.time()
            done = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--run", str(run), "--iter", str(iteration)],
                                  cwd=ROOT, capture_output=True, text=True)
            seconds[f"{stage}_{iteration}"] = round(time.time() - began, 1)
            if done.returncode != 0:
                return {"seconds": seconds, "error": f"stages.{stage} iter {iteration}: "
                        + (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    checked = subprocess.run([sys.executable, "-m", "orchestrator", "check", "--run", str(run)], cwd=ROOT,
                             capture_output=True, text=True)
    return {"seconds": seconds, "orchestrator_check": checked.stdout.strip().splitlines()[-1:],
            "ok": checked.returncode == 0}


# ---- the driver ----------------------------------------------------------------------------------

def run_one(name: str, out: Path, scale: Scale) -> None:
    """In the child process: one check, its result(s) as JSON lines on stdout."""
    sys.path.insert(0, str(ROOT))
    from common.libraries import quiet_libraries

    quiet_libraries()
    results = globals()[f"check_{name}"](out, scale)
    for result in results if isinstance(results, list) else [{"check": name, **results}]:
        print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="small shapes on this CPU: every check's code path")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--budget-s", type=float, default=560, help="stop starting checks past this (default: %(default)s)")
    parser.add_argument("--only", default=None, help="run one check, in this process")
    args = parser.parse_args(argv)
    scale = CPU if args.cpu else GPU
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only:
        run_one(args.only, args.out, scale)
        return 0
    (args.out / RESULTS).unlink(missing_ok=True)
    started, failures = time.time(), 0
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])}
    for name, gpu_limit, cpu_limit in CHECKS:
        limit = min(cpu_limit if args.cpu else gpu_limit, args.budget_s - (time.time() - started))
        results: list[dict] = []
        if limit < 20:
            results = [{"check": name, "status": "skipped", "why": "no time left in --budget-s"}]
        else:
            command = [sys.executable, "-m", "bench.gpu_check", "--only", name, "--out", str(args.out)]
            began = time.time()
            try:
                done = subprocess.run(command + (["--cpu"] if args.cpu else []), cwd=ROOT, capture_output=True,
                                      text=True, timeout=limit, env=environment)
                results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines()
                           if line.startswith("RESULT ")]
                if done.returncode != 0:
                    tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                    results.append({"check": name, "status": "failed", "error": tail[-400:]})
            except subprocess.TimeoutExpired:
                results.append({"check": name, "status": "failed", "error": f"timed out after {limit:.0f} s"})
            for result in results:
                result.setdefault("status", "ok" if result.get("ok", True) and "error" not in result else "failed")
                result["check_seconds"] = round(time.time() - began, 1)
        for result in results:
            failures += result["status"] == "failed"
            line = json.dumps(result)
            print(line, flush=True)
            with open(args.out / RESULTS, "a") as handle:
                handle.write(line + "\n")
    print(f"gpu-check: {time.time() - started:.0f} s, {failures} failed; results in {args.out / RESULTS}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
