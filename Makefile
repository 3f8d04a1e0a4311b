# Two commands on a fresh machine: `make demo` and `make test`.
# The environment lives in .venv; torch defaults to the CPU build (fast and offline-safe here).
# GPU users: make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126" (see README).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: venv demo test benchmarks clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/multitaskseg demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q

benchmarks: $(STAMP)
	$(PY) benchmarks/bench_triplanar_inference.py --threads 1 --sample 8
	$(PY) benchmarks/bench_triplanar_training.py --threads 1
	@if [ -f ../shared/data/brain_fs/fstd-sub-01/t1_head.nii.gz ]; then $(PY) benchmarks/bench_brain_inference.py; \
	else echo "bench_brain_inference.py skipped: it needs a real T1 in ../shared/data (or run it with --input T1.nii.gz)"; fi

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
