# Set-up commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: a CPU build from its pinned version, unless a torch is already importable (e.g. a GPU machine).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Until `memmcl pipeline` exists, the demo runs the furthest phase that does: one LoRA expert on the embedded
# sc_binary task (fit, then test and predict with the exported adapter).
DEMO_RUN := runs/expert/sc_binary/demo
demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/memmcl fit --config configs/demo/expert.yaml --trainer.logger.init_args.version=demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/memmcl test --config configs/demo/expert.yaml --trainer.logger.init_args.version=demo-test \
		--model.init_args.adapter=$(DEMO_RUN)/expert
	HF_HUB_OFFLINE=1 $(VENV)/bin/memmcl predict --config configs/demo/expert.yaml --trainer.logger.init_args.version=demo-predict \
		--model.init_args.adapter=$(DEMO_RUN)/expert
	@echo "expert: $(DEMO_RUN)/expert  predictions: runs/expert/sc_binary/predictions.jsonl  tensorboard --logdir runs/expert"

test: venv
	# pytest exit code 5 (no tests collected) is not a failure.
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q || [ $$? -eq 5 ]

bench: venv
	for b in benchmarks/*.py; do HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

lint: venv
	$(VENV)/bin/ruff check memmcl callbacks tests benchmarks

clean:
	rm -rf runs lightning_logs .pytest_cache
