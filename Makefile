# Two commands do all the set-up on a fresh machine:
#   make demo   installs what it needs, then runs the whole pipeline (synthetic data unless real data is present)
#   make test   installs what it needs, then runs the linter and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint install bench scaling reproduce-seed results notebooks clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dicom,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/covidxray demo

test: install
	$(BIN)/ruff check covidxray tests bench
	$(BIN)/python -m pytest

# The quick gate while working (under 3 minutes on 2 cores): lint, and every test but the slow ones (the notebooks,
# the benchmarks, multi-worker clusters, the big robustness matrices); it still trains a tiny model end to end.
test-fast: install
	$(BIN)/ruff check covidxray tests bench
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check covidxray tests bench

# Side-by-side benchmark against the 2020-style pipeline (about half an hour on 2 idle cores; --quick: 2 minutes,
# written into runs/bench-quick/, never over the committed bench/results.*).
bench: install
	$(BIN)/python -m bench

# The scaling curve alone (10 %, 30 %, 100 % of 6,000 synthetic images; float32 and bfloat16 where the CPU has bf16):
# about 45 minutes; run it with nothing else on the machine. Writes bench/scaling_results.json and .md.
scaling: install
	$(BIN)/python -m bench --scaling

# The long runs behind the README's tables and the rendered notebooks (need ../shared/data; minutes to hours).
SHARED ?= ../shared/data
reproduce-seed: install
	$(BIN)/covidxray reproduce --presplit $(SHARED)/seed-dataset --metadata $(SHARED)/ieee8023-metadata/metadata-early.csv \
		--weights hed --out runs/seed-original-split

# README tables 1-3: both reproductions with 5 seeds in bfloat16 (about an hour on 2 cores with bf16 instructions),
# their results files copied into results/, then the README's tables generated from them.
results: install
	$(BIN)/python -m bench.seeds --shared $(SHARED) --seeds 5 --precision bfloat16
	$(BIN)/python -m covidxray.studies.readme_tables

# Renders from a clean slate: refuses while dataset/, runs/scratch etc. hold earlier results; FRESH=1 moves them
# aside into runs/before-render-<time>/ first.
notebooks: install
	$(BIN)/python -m covidxray.app.render_notebooks --shared $(SHARED) $(if $(FRESH),--fresh)

clean:
	rm -rf $(VENV) runs .pytest_cache
