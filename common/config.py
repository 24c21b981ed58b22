"""The run configuration: YAML -> validated dataclasses, `key.sub=value` overrides, a stable hash.

Every knob of the pipeline is declared here, once, with its type and default. Loading rejects
unknown keys and wrong types with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from common.errors import ConfigError

# Every choice a key can take, once: `Literal` fields are checked on load against these.
Loss = Literal["k1", "vopd", "poweropd", "k2", "k3", "abs", "forward_kl_topk", "forward_kl_topk_renorm",
               "reverse_kl_topk"]
Engine = Literal["hf", "vllm"]
ScoreEngine = Literal["hf", "vllm", "server"]
RewardMode = Literal["correct", "deepscaler"]
Mode = Literal["subprocess", "resident"]
GuardAction = Literal["warn", "stop"]
OldLogprobs = Literal["recompute", "rollout"]
LOSSES: tuple[str, ...] = typing.get_args(Loss)  # each defined in stages/train/loss.py
# Whose top-k ids a loss compares the two models at (the teacher's from scoring, the student's from sampling).
TOPK_LOSSES = {"forward_kl_topk": "teacher", "forward_kl_topk_renorm": "teacher", "reverse_kl_topk": "student",
               "vopd": "student"}
# The losses in policy-gradient form (a detached per-token advantage in a PPO surrogate); the others are
# direct losses on the same tokens.
POLICY_GRADIENT_LOSSES = ("k1", "vopd", "poweropd")


@dataclass
class ModelConfig:
    student: str = "assets/tiny/student"   # HF folder (or hub id) of the initial policy
    teacher: str = "assets/tiny/teacher"


@dataclass
class DataConfig:
    train: str = "assets/tiny/data/train.parquet"   # DAPO-Math schema
    max_prompt_tokens: int = 1024   # longer prompts are dropped and counted
    enable_thinking: bool = False   # passed to the chat template
    epochs: int = 0                 # passes over the prompts before `iterate` stops; 0 = no limit


@dataclass
class GenerateConfig:
    engine: Engine = "hf"           # stages/generate/sampling.py
    prompts_per_iteration: int = 64
    n: int = 4                      # responses per prompt
    max_response_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 256           # sequences per engine call (HF: at most; the KV budget may make it fewer)
    # HF engine: the KV cache a batch may hold, GiB; 0 = 60% of the GPU memory free after the weights
    # (8 GiB on a CPU). A batch holds rows x (prompt + max new tokens) x the model's KV bytes per token.
    kv_cache_gib: float = 0.0
    # An iteration's rollouts and each eval set are cut into shards (one task each, on any worker):
    # at least `shards` of them (0: one per generation worker, resolved at the run's first start and
    # frozen in run.yaml, so the bytes never depend on the cluster a run continues on), and at most
    # `rows_per_shard` responses each.
    shards: int = 0
    rows_per_shard: int = 1024
    student_topk: int = 0           # also store the student's top-k ids and log-probs per token
    max_model_len: int = 0          # vLLM engine context; 0 = the longest prompt + response (config.model_len)
    gpu_memory_utilization: float = 0.5  # vLLM: share of the GPU for weights + KV cache (the teacher needs room too)
    enforce_eager: bool = False     # vLLM: skip torch.compile and CUDA graphs (faster start, slower decoding)


@dataclass
class ScoreConfig:
    engine: ScoreEngine = "hf"      # vllm: prompt log-probs (no top-k at the student's ids); server: score.url
    url: str = ""                   # server: an OpenAI-compatible endpoint serving the teacher, e.g. http://host:8000/v1
    request_timeout_s: float = 300.0  # server: per request (a batch of rows)
    retries: int = 4                # server: attempts after the first, with exponential backoff
    batch_size: int = 64            # at most this many sequences per teacher forward
    max_tokens_per_batch: int = 65536  # and at most this many prompt + response tokens (batches planned by tokens)
    logit_chunk_tokens: int = 4096  # rows of the LM head materialised at once
    teacher_topk: int = 0           # also store the teacher's own top-k ids and log-probs per token
    packing: bool = False           # as train.packing, for the teacher forward
    reward_mode: RewardMode = "correct"  # correct (1/0) | deepscaler (0.67 correct boxed + 0.33 format)
    verifier_workers: int = 2       # processes for answers that need symbolic comparison
    verifier_timeout_s: float = 5.0  # per response; a worker past it is killed and replaced
    max_model_len: int = 0          # vLLM: 0 = the longest prompt + response (config.model_len)
    gpu_memory_utilization: float = 0.3  # vLLM: share of the GPU for the teacher's weights + KV cache
    enforce_eager: bool = False     # vLLM: skip torch.compile and CUDA graphs
    # Several teachers, one per domain: data_source -> teacher model (folder or hub id); the key
    # "default" serves every other source. Empty: model.teacher scores everything (teacher_routes).
    teachers: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    loss: Loss = "k1"               # stages/train/loss.py
    # null: the loss's own form (k1, vopd, poweropd in policy-gradient form, the others direct); resolved
    # at load. verl can also turn k3 or the top-k losses into a reward; that is not built here (refused).
    policy_gradient: bool | None = None
    power_alpha: float = 5.0        # poweropd: the reward p_teacher^alpha - p_student^alpha (PowerOPD's default)
    use_task_rewards: bool = False  # add a PPO term on the GRPO advantage of the rule reward
    distill_coef: float = 1.0       # with task rewards: loss = ppo(task) + distill_coef * distillation
    tis: bool = False               # truncated importance sampling on the sampler/trainer gap
    tis_cap: float = 2.0
    # lp_old of the PPO ratio: "recompute" = the trainer's forward of v_i before the first step (verl's
    # default, exact whatever the sampler's numerics); "rollout" = the sampler's own log-probs from the
    # shard, saving that forward (verl's bypass mode, NeMo-RL's skip_prev_logprobs): sound where the
    # sampler computes what the trainer would (the HF engine in fp32: train/logprob_gap_max ~1e-6).
    old_logprobs: OldLogprobs = "recompute"
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0           # linear warmup, then constant (or the cosine below)
    decay_steps: int = 0            # > 0: cosine from lr to min_lr_ratio x lr over this many steps after warmup
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    mini_batch_prompts: int = 16    # prompts per optimizer step (x n responses)
    micro_batch_size: int = 64      # at most this many sequences per forward/backward
    max_tokens_per_micro_batch: int = 8192  # dynamic micro-batches: at most this many tokens each
    # Padding removal: sequences back to back in one row. Pays with a varlen attention kernel
    # (flash-attention on GPU); with sdpa the packed row gets a dense block mask, quadratic in its length.
    packing: bool = False
    gradient_checkpointing: bool = False
    bf16: bool = True               # on GPU; CPU training is always fp32
    zero_stage: int = 1
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer state and step on the CPU
    offload_params: bool = False     # ZeRO 3: parameters on the CPU between uses
    processes: int = 1              # data-parallel ranks on this machine (DeepSpeed launcher)
    keep_checkpoint_every: int = 0  # keep v_k for k % N == 0 (and the latest two); 0 = keep every one
    # verl's clamps: k1's |lp - lq| before it becomes an advantage, every other mode's per-token loss.
    loss_max_clamp: float = 10.0
    log_prob_min_clamp: float = -10.0  # forward_kl_topk: floor of both models' log-probs at the top-k ids
    clip_ratio: float = 0.2
    dual_clip: float = 3.0
    logit_chunk_tokens: int = 4096
    # torchtune's habit, off by default: >= 0 traces that iteration's training (lp_old and every step) with
    # torch.profiler on each rank: <run>/profile/iter=<i>-rank<r>.json (Chrome trace) and a .txt top-30 table.
    profile_iteration: int = -1


@dataclass
class EvalConfig:
    every: int = 5                  # iterations; 0 disables
    sets: list = field(default_factory=lambda: ["assets/tiny/data/eval.parquet"])  # DAPO-schema parquets
    k: int = 1                      # samples per prompt: accuracy is avg@k
    prompts: int = 0                # at most this many prompts per set; 0 = all
    temperature: float = 0.7        # the paper's evaluation sampling
    top_p: float = 0.95
    max_response_tokens: int = 64


@dataclass
class OrchestratorConfig:
    # resident: one controller, Dask workers that keep the generation engine, the teacher and the
    # trainer loaded across iterations (orchestrator/roles.py);
    # subprocess: a fresh process per stage (nothing held between stages; for debugging one stage).
    mode: Mode = "resident"


@dataclass
class HealthConfig:
    # The fraction of an iteration's rollouts cut at generate.max_response_tokens: the first sign of
    # the "truncation collapse" of OPD at long lengths (StableOPD, arXiv 2604.08527). Past it, the
    # loop warns, or stops before training on them (the rollouts stay sealed; rerun to go on).
    max_truncated_fraction: float = 0.25
    on_truncation: GuardAction = "warn"


@dataclass
class ClusterConfig:
    address: str = ""               # Dask scheduler to join; empty = an embedded LocalCluster
    workers: int = 0                # embedded cluster: 0 = one worker per visible GPU (1 on a CPU); each has every role
    # Peak dense TFLOP/s of one device for train/mfu and score/mfu (common/flops.py); 0 = from the GPU's
    # name (H100/H200 989, A100 312, bf16), none on a CPU (then no mfu is logged).
    peak_tflops: float = 0.0


@dataclass
class MlflowConfig:
    tracking_uri: str = ""          # empty: sqlite:///<runs root>/mlflow.db
    experiment: str = "opd"


@dataclass
class Config:
    seed: int = 0
    threads: int = 0                # torch intra-op threads per stage process; 0 = torch default
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def results_dict(self) -> dict:
        """The keys that change what a run computes: all but how and where it runs (OPERATIONAL)."""
        return {key: value for key, value in self.to_dict().items() if key not in OPERATIONAL}

    def hash(self) -> str:
        """The run's identity: a hash of `results_dict()`. Switching a run to resident mode, another
        cluster, another MLflow store or other health guards keeps it (thread counts may move fp32
        rounding, not results)."""
        return hashlib.sha256(json.dumps(self.results_dict(), sort_keys=True).encode()).hexdigest()[:16]


OPERATIONAL = ("orchestrator", "cluster", "mlflow", "threads", "health")


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(known))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key, value, kind = prefix + f.name, raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = _build(kind, value, key + ".")
        elif typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            if value not in choices:
                raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
            values[f.name] = value
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[f.name] = float(value)
        elif kind is float and isinstance(value, str):
            try:
                values[f.name] = float(value)  # YAML reads 1e-6 (no dot) as a string
            except ValueError:
                raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
        elif value is None and type(None) in typing.get_args(kind):  # an optional key left unset
            values[f.name] = None
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = " or ".join(k.__name__ for k in typing.get_args(kind)) or kind.__name__
            raise ConfigError(f"config key '{key}': expected {expected}, got {type(value).__name__} {value!r}")
        else:
            values[f.name] = value
    return cls(**values)


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key.sub=value")
    dotted, text = override.split("=", 1)
    node = raw
    *parents, leaf = dotted.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
    node[leaf] = yaml.safe_load(text)


def validate(config: Config) -> Config:
    """Cross-field rules that types alone cannot express."""
    g, t = config.generate, config.train
    rules = [
        (0 < g.gpu_memory_utilization <= 1, "generate.gpu_memory_utilization", "must be in (0, 1]"),
        (config.score.engine not in ("vllm", "server") or g.student_topk == 0, "generate.student_topk",
         f"score.engine '{config.score.engine}' cannot return the teacher's log-probs at the student's top-k ids: "
         "use score.engine hf"),
        (config.score.engine != "server" or config.score.url.startswith(("http://", "https://")), "score.url",
         "score.engine 'server' needs the teacher's endpoint, e.g. http://host:8000/v1"),
        (config.score.engine != "server" or len(set(teacher_routes(config).values())) == 1, "score.teachers",
         "score.engine 'server' scores with the one teacher at score.url; several teachers run in-process (hf)"),
        (config.score.retries >= 0 and config.score.request_timeout_s > 0, "score.retries",
         "must be >= 0 (and score.request_timeout_s positive)"),
        (0 < config.score.gpu_memory_utilization <= 1, "score.gpu_memory_utilization", "must be in (0, 1]"),
        (TOPK_LOSSES.get(t.loss) != "teacher" or config.score.teacher_topk > 0, "score.teacher_topk",
         f"{t.loss} needs the teacher's top-k: set it > 0"),
        (TOPK_LOSSES.get(t.loss) != "student" or g.student_topk > 0, "generate.student_topk",
         f"{t.loss} needs the student's top-k: set it > 0"),
        (t.loss_max_clamp > 0, "train.loss_max_clamp", "must be positive"),
        (t.zero_stage > 0 or t.processes == 1, "train.zero_stage",
         "stage 0 with train.processes > 1 cannot report the global gradient norm: use stage 1 (same communication)"),
        (t.max_tokens_per_micro_batch >= 1, "train.max_tokens_per_micro_batch", "must be at least 1"),
        (config.score.max_tokens_per_batch >= 1, "score.max_tokens_per_batch", "must be at least 1"),
        (t.processes >= 1, "train.processes", "must be at least 1"),
        (t.tis_cap >= 1.0, "train.tis_cap", "must be >= 1"),
        (not t.offload_optimizer or t.zero_stage >= 1, "train.offload_optimizer", "needs train.zero_stage >= 1"),
        (not t.offload_params or t.zero_stage == 3, "train.offload_params", "needs train.zero_stage = 3"),
        (g.student_topk >= 0 and config.score.teacher_topk >= 0, "generate.student_topk", "must be >= 0"),
        (t.loss not in POLICY_GRADIENT_LOSSES or t.policy_gradient is not False, "train.policy_gradient",
         f"{t.loss} without the policy-gradient form has no gradient from the teacher; set it to true (or drop it)"),
        (t.loss in POLICY_GRADIENT_LOSSES or not t.policy_gradient, "train.policy_gradient",
         f"'{t.loss}' is a direct loss here; verl's policy-gradient form of it (the estimator as a reward) is not "
         "built (fix: drop the key, or use k1, vopd or poweropd)"),
        (not t.tis or t.loss in POLICY_GRADIENT_LOSSES or t.use_task_rewards, "train.tis",
         f"truncated IS weights correct a policy-gradient loss (as in verl); '{t.loss}' is a direct loss and would "
         "be left unweighted (fix: drop train.tis, or use k1, vopd or poweropd)"),
        (not (t.tis and t.old_logprobs == "rollout"), "train.old_logprobs",
         "'rollout' makes lp_old the sampler's log-probs, so train.tis's weights exp(lp_old - lp_rollout) would all "
         "be 1 (fix: drop train.tis, or use train.old_logprobs=recompute)"),
        (t.power_alpha > 0, "train.power_alpha", "must be positive (the log-ratio of k1 is the limit alpha -> 0)"),
        (g.n >= 1, "generate.n", "must be at least 1"),
        (g.rows_per_shard >= 1, "generate.rows_per_shard", "must be at least 1"),
        (config.cluster.peak_tflops >= 0, "cluster.peak_tflops", "must be >= 0 (0: from the GPU's name)"),
        (config.cluster.workers >= 0, "cluster.workers", "must be >= 0 (0: one per visible GPU, 1 on a CPU)"),
        (g.shards >= 0, "generate.shards", "must be >= 0 (0: one per generation worker)"),
        (g.kv_cache_gib >= 0, "generate.kv_cache_gib", "must be >= 0 (0: from the device's free memory)"),
        (0 <= config.health.max_truncated_fraction <= 1, "health.max_truncated_fraction", "must be in [0, 1]"),
        (g.prompts_per_iteration >= 1, "generate.prompts_per_iteration", "must be at least 1"),
        (t.mini_batch_prompts <= g.prompts_per_iteration, "train.mini_batch_prompts",
         f"{t.mini_batch_prompts} is larger than generate.prompts_per_iteration={g.prompts_per_iteration}"),
        (t.mini_batch_prompts >= 1 and g.prompts_per_iteration % t.mini_batch_prompts == 0, "train.mini_batch_prompts",
         f"{t.mini_batch_prompts} does not divide generate.prompts_per_iteration={g.prompts_per_iteration}"),
        (t.micro_batch_size >= 1, "train.micro_batch_size", "must be at least 1"),
        (t.zero_stage in (0, 1, 2, 3), "train.zero_stage", "must be 0, 1, 2 or 3"),
        (t.lr > 0, "train.lr", "must be positive"),
        (t.warmup_steps >= 0 and t.decay_steps >= 0, "train.decay_steps", "must be >= 0 (as train.warmup_steps)"),
        (0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]"),
        # The trainer's and the teacher's log-probs are of the untempered, untruncated distribution:
        # rollouts sampled from another one would be off-policy for the loss (eval has its own sampling).
        (g.temperature == 1.0, "generate.temperature",
         f"{g.temperature} != 1: the loss compares temperature-1 log-probs, so training rollouts must be sampled "
         "at temperature 1 (eval.temperature sets the evaluation's)"),
        (g.top_p == 1.0, "generate.top_p",
         f"{g.top_p} != 1: top-p truncates the sampling distribution the loss assumes; use 1.0 (eval.top_p sets the "
         "evaluation's)"),
        (config.eval.every >= 0, "eval.every", "must be >= 0"),
        (config.eval.k >= 1, "eval.k", "must be at least 1"),
        (all(isinstance(path, str) for path in config.eval.sets), "eval.sets", "must be a list of parquet paths"),
        (config.data.epochs >= 0, "data.epochs", "must be >= 0"),
        (t.keep_checkpoint_every >= 0, "train.keep_checkpoint_every", "must be >= 0"),
        (g.max_model_len == 0 or g.max_model_len >= needed_model_len(config, "generate"), "generate.max_model_len",
         f"{g.max_model_len} < {needed_model_len(config, 'generate')}, the longest prompt + response + 1"),
        (config.score.max_model_len == 0 or config.score.max_model_len >= needed_model_len(config, "score"),
         "score.max_model_len",
         f"{config.score.max_model_len} < {needed_model_len(config, 'score')}, the longest prompt + response + 1"),
        (config.score.verifier_workers >= 1, "score.verifier_workers", "must be at least 1"),
        (config.score.verifier_timeout_s > 0, "score.verifier_timeout_s", "must be positive"),
    ]
    for ok, key, message in rules:
        if not ok:
            raise ConfigError(f"config key '{key}': {message}")
    teachers = config.score.teachers
    if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in teachers.items()):
        raise ConfigError("config key 'score.teachers': expected data_source: teacher model pairs of strings")
    names: dict[str, str] = {}
    for model in teacher_routes(config).values():
        if names.setdefault(teacher_name(model), model) != model:
            raise ConfigError(f"config key 'score.teachers': {model} and {names[teacher_name(model)]} have the same "
                              f"name {teacher_name(model)!r} (the scored shards' teacher column) (fix: rename a folder)")
    if t.policy_gradient is None:  # resolved, so that the saved config says which form ran
        t.policy_gradient = t.loss in POLICY_GRADIENT_LOSSES
    return config


def teacher_routes(config: Config) -> dict[str, str]:
    """data_source -> teacher model: score.teachers, or model.teacher for every source."""
    return dict(config.score.teachers) or {"default": config.model.teacher}


def teacher_for(config: Config, data_source: str) -> str:
    """The teacher model that scores rows of `data_source` (its own, else the default)."""
    routes = teacher_routes(config)
    if data_source in routes:
        return routes[data_source]
    if "default" in routes:
        return routes["default"]
    raise ConfigError(f"config key 'score.teachers': no teacher for data_source {data_source!r} and no 'default' "
                      f"(fix: add '{data_source}: <teacher>' or 'default: <teacher>' under score.teachers)")


def teacher_name(model: str) -> str:
    """The short name of a teacher (its folder's or hub id's last part): the `teacher` column, metric names."""
    return Path(str(model).rstrip("/")).name


def model_len(config: Config, role: Literal["generate", "score"]) -> int:
    """The longest sequence a vLLM engine of `role` must hold (its `max_model_len`): the configured
    value, else the longest prompt plus the longest response it samples or scores, plus one (vLLM
    generates a token past the end, the scorer's dummy token)."""
    configured = config.generate.max_model_len if role == "generate" else config.score.max_model_len
    return configured or needed_model_len(config, role)


def needed_model_len(config: Config, role: Literal["generate", "score"]) -> int:
    """The longest prompt plus the longest response `role` samples (eval's too) or scores, plus one."""
    longest = config.generate.max_response_tokens
    if role == "generate":
        longest = max(longest, config.eval.max_response_tokens)
    return config.data.max_prompt_tokens + longest + 1


def check_kv_budget(config: Config) -> None:
    """With generate.kv_cache_gib set and the student's config.json at hand, a budget that cannot hold
    one sequence of the longest prompt + response is refused here, before anything runs (an automatic
    budget is checked when the engine opens, on the device's free memory)."""
    g = config.generate
    model_file = Path(config.model.student) / "config.json"
    if g.kv_cache_gib == 0 or g.engine != "hf" or not model_file.exists():
        return
    model = json.loads(model_file.read_text())
    head_dim = model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"]
    from common.devices import visible_gpus  # torch-free

    itemsize = 2 if visible_gpus() else 4  # the engine's dtype: bf16 on a GPU, fp32 on a CPU
    per_token = 2 * model["num_hidden_layers"] * model["num_key_value_heads"] * head_dim * itemsize
    longest = config.data.max_prompt_tokens + max(g.max_response_tokens, config.eval.max_response_tokens)
    if longest * per_token > g.kv_cache_gib * 2**30:
        raise ConfigError(f"config key 'generate.kv_cache_gib': {g.kv_cache_gib} GiB cannot hold one sequence of "
                          f"{longest:,} tokens ({longest * per_token / 2**30:.2f} GiB at {per_token:,} bytes of KV per "
                          "token) (fix: raise it, or shorten the responses)")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        _apply_override(raw, override)
    config = validate(_build(Config, raw, ""))
    check_kv_budget(config)
    return config


def config_from_dict(raw: dict) -> Config:
    return validate(_build(Config, raw, ""))


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
