# make demo: venv + install + sample data + LoDisc pretraining + kNN of it and of the random-init floor.
# make test: the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
DEMO_RUN := runs/sample_lodisc

.PHONY: setup data demo test test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

data: setup
	$(BIN)/python -m sslfg.data.sample --out data/sample

demo: data
	$(BIN)/python train_ssl.py --config configs/pretrain/sample.yaml output_dir=$(DEMO_RUN) resume=auto
	$(BIN)/python -m eval.knn --checkpoint $(DEMO_RUN) --dataset configs/datasets/sample.yaml
	$(BIN)/python -m eval.knn --checkpoint $(DEMO_RUN) --dataset configs/datasets/sample.yaml --random-init knn.figures=false
	@echo "results: $(DEMO_RUN)/ (summary.json, metrics.jsonl, figures/, eval/knn.json, eval-random/knn.json)"

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
