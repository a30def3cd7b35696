# Two entry points for a fresh machine (Python 3.11 + package registries):
#   make test   create .venv, install hf_vla with the tested pins, run the test suite
#   make demo   same environment, the main job: one prediction from the embedded default model (trained on
#               Meta-World), then the Space on http://127.0.0.1:7860 with that model (Ctrl-C stops it)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py requirements/constraints.txt | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export GRADIO_ANALYTICS_ENABLED := False
PYTEST_ARGS ?=
PORT ?= 7860

.PHONY: install browser gl test demo space bench clean

$(STAMP): setup.py requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls GBs of CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[dev]"  # dev = train, serve, spaces, tokenizers, sim
	# openpi's own client, for the protocol tests: its numpy<2 pin is stale, so no dependency resolution
	$(BIN)/pip install -q --no-deps openpi-client==0.1.2
	# DeepSpeed as a pure-python wheel; its CPU ops compile on first use (the ZeRO-2 test)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c requirements/constraints.txt deepspeed
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the Space's browser test (Debian's package; the test skips, saying why, if it is missing)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium: the browser test will be skipped"

# Offscreen OpenGL for the simulator (Meta-World renders through EGL, Mesa's llvmpipe on a CPU)
gl:
	@$(PYTHON) -c "import ctypes.util, sys; sys.exit(not (ctypes.util.find_library('EGL') or ctypes.util.find_library('OSMesa')))" || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null) || echo "could not install EGL (libegl1 libegl-mesa0 libgl1-mesa-dri): the simulator tests will fail"

test: install browser gl
	$(BIN)/python -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

demo: install
	$(BIN)/hf-vla demo
	$(BIN)/python spaces/app.py --port $(PORT)

space: install
	$(BIN)/python spaces/app.py

bench: install
	$(BIN)/python benchmarks/predict_latency.py

clean:
	rm -rf $(VENV) build src/*.egg-info
