# make demo: venv + install + sample data + the cluttered study's seed 0 at 2 pretraining epochs (pretraining arms, evaluations, localisation,
# fine-tuning, report).
# make test: the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)
DEMO_STUDY := runs/study_cluttered

.PHONY: setup data demo test test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

data: setup
	$(BIN)/python -m sslfg.data.build.sample --out data/sample
	$(BIN)/python -m sslfg.data.build.cluttered --out data/cluttered

demo: data
	$(BIN)/python -m sslfg.study --config configs/study/cluttered.yaml pretrain.epochs=2 pretrain.warmup_epochs=0.5 output_dir=$(DEMO_STUDY)
	@echo "results: $(DEMO_STUDY)/report/report.md (accuracies, localisation, curves, kept patches, GLS boxes, crops); runs in $(DEMO_STUDY)/seed0/"

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
