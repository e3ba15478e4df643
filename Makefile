# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv, install torch 2.13.0 first (our machines carry its CPU wheel; a GPU machine gets the
# CUDA build of the same version), then the project with every transitive pin from requirements.lock.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: demo test install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml requirements.lock | $(VENV)/bin/python
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c requirements.lock -e '.[local,test]'
	$(PIP) check
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/simplepose demo

# SIGINT, not SIGKILL, on timeout: Ray cleans up its processes on SIGINT.
test: install
	timeout -s INT 3600 $(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info

# One-shot GPU check (docs/benchmarks.md, "One-shot GPU check"): on a bare machine with an NVIDIA GPU, with that
# machine's own python3 and torch (no venv, no install); at most 8 minutes; the last stdout line is one JSON object.
# GPU_CHECK_ARGS: e.g. --budget-s 300, --data DIR, --wheels DIR, --out FILE; --smoke runs it on a CPU.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

# On the development machine, before a device call: the pycocotools wheel for the GPU machine's Python 3.12 and a
# copy of coco-mini, in folders git ignores (.whl/, .gpu-data/), for the call to carry (docs/benchmarks.md).
SHARED ?= ../shared
.PHONY: gpu-check-bundle
gpu-check-bundle:
	for d in /.whl/ /.gpu-data/; do grep -qxF $$d .git/info/exclude || echo $$d >> .git/info/exclude; done
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux2014_x86_64 -d .whl pycocotools==$$(sed -n 's/^pycocotools==//p' requirements.lock)
	mkdir -p .gpu-data && cp -r $(SHARED)/data/coco-mini .gpu-data/
