# The two commands of the README, plus bench. Each creates .venv first.
#   make demo   set up, then run the demo
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.polarprune-installed

# Pinned versions for CI and `make`; setup.py declares the ranges the package supports.
PINS := \
	torch==2.14.1 \
	numpy==2.4.6 \
	ninja==1.13.2 \
	pybind11==3.1.0 \
	pytest==9.2.0 \
	pytest-benchmark==5.3.1 \
	pytest-timeout==2.4.0 \
	hypothesis==6.170.15 \
	torch-pruning==1.6.1 \
	torchvision==0.29.1 \
	timm==1.0.31 \
	huggingface_hub==2.4.0 \
	safetensors==0.8.0 \
	PyYAML==6.0.4 \
	scikit-learn==1.9.1 \
	matplotlib==3.11.2 \
	tqdm==4.70.1 \
	nvidia-ml-py==13.615.71 \
	onnx==1.23.2 \
	onnxscript==0.7.2 \
	onnx-ir==1.1.0 \
	ml_dtypes==0.6.0 \
	protobuf==7.36.2 \
	onnxruntime==1.32.0 \
	flatbuffers==25.12.19

PYTEST_ARGS ?=

.PHONY: setup demo test zoo bench gpu-wheels clean

setup: $(STAMP)

$(STAMP): setup.py Makefile $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=80" wheel
	$(PIP) install $(PINS)
	$(PIP) install --no-build-isolation -e ".[train,dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/polarprune prune --baseline --overwrite --out runs/demo

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# the whole model zoo (every torchvision classification model and the timm list; about an hour on 2 cores)
zoo: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/surgery/test_zoo.py --zoo $(PYTEST_ARGS)

# CPU benchmark suites -> benchmarks/results/<device>-<date>.{json,md,png} and the README table
bench: setup
	$(BIN)/python benchmarks/run.py --keep-raw

# wheels that the GPU machine lacks (it has no network; Python 3.12 there): torch-pruning, into .whl/ (ignored by
# git). The device command carries it: `benchmarks/gpu_first.sh $$OUT` with carry [".whl"] (README, Benchmarks).
GPU_WHEELS := torch-pruning==1.6.1
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	@ls -l .whl

clean:
	rm -rf $(VENV) build *.egg-info
