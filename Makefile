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

.PHONY: setup demo test zoo bench gpu-wheels gpu-data gpu-dryrun clean

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

# CPU benchmark suites -> benchmarks/results/<device>-<date>.{json,md,png} and the results block of benchmarks/README.md
bench: setup
	$(BIN)/python benchmarks/run.py --keep-raw

# wheels that the GPU machine lacks (it has no network; Python 3.12 there): torch-pruning, into .whl/ (ignored by
# git). The device command carries it: `benchmarks/gpu_first.sh $$OUT` with carry [".whl"] (benchmarks/README.md).
GPU_WHEELS := torch-pruning==1.6.1
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	@ls -l .whl

# Fashion-MNIST's four files into data/fashion-mnist (ignored by git) for the campaign's second command,
# benchmarks/gpu_second.sh, carried with the wheels (carry ["data", ".whl"]); from the Debian package
# dataset-fashion-mnist (or FASHION_DIR=...)
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
gpu-data:
	@test -f $(FASHION_DIR)/train-images-idx3-ubyte.gz || { echo "gpu-data needs Fashion-MNIST in $(FASHION_DIR) (apt-get install dataset-fashion-mnist, or FASHION_DIR=...)"; exit 2; }
	mkdir -p data/fashion-mnist
	cp $(FASHION_DIR)/*-ubyte.gz data/fashion-mnist/
	@ls -l data/fashion-mnist

# The GPU campaign's dry run (benchmarks/README.md): a virtual environment with the GPU image's versions (pinned,
# from the package index; no GPU needed) in .venv-gpu, then benchmarks/gpu_first.sh with DRY_RUN=1 in it: the
# extension built as the campaign builds it, every Triton kernel AOT-compiled for sm_90 with the runtime's
# specialisation, tests/ops on the CPU. Results in benchmarks/results/gpu-dryrun-<date>/. About 3.5 minutes on
# 2 cores from an empty .venv-gpu (measured 2026-12-06: packages 75 s, build 72 s, AOT 19 s, tests 38 s).
GPU_VENV  ?= .venv-gpu
GPU_IMAGE_PYTHON ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) /usr/bin/python3.12,$(shell $(p) -c 'import sys; print(sys.executable if sys.version_info[:2] == (3, 12) else "")' 2>/dev/null)))
GPU_IMAGE_PINS := pip==25.1.1 setuptools==80.9.0 wheel torch==2.11.0 triton==3.6.0 torchvision==0.26.0 numpy==2.5.2 \
	ninja pybind11 pytest pytest-xdist pytest-timeout pytest-benchmark hypothesis torch-pruning==1.6.1
GPU_DRYRUN_OUT ?= benchmarks/results/gpu-dryrun-$(shell date +%Y-%m-%d)
gpu-dryrun:
	@test -n "$(GPU_IMAGE_PYTHON)" || { echo "gpu-dryrun needs Python 3.12 (the GPU image's): set GPU_IMAGE_PYTHON"; exit 2; }
	test -x $(GPU_VENV)/bin/python || $(GPU_IMAGE_PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q $(GPU_IMAGE_PINS)
	DRY_RUN=1 PYTHON=$(GPU_VENV)/bin/python bash benchmarks/gpu_first.sh $(GPU_DRYRUN_OUT)

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info
