# Two commands for a newcomer: `make demo` (builds a real model end to end) and `make test`.
# Both create .venv and install the project first (`make install`, idempotent).

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# ../shared/mirror holds real model files and images; it is used as a mirror when it exists.
MIRROR  ?= $(wildcard ../shared/mirror)
MZ      := $(BIN)/mzconvert $(if $(MIRROR),--mirror $(abspath $(MIRROR)))
# Recipes whose sources can be had on a machine without internet access (the others need their origin).
BUILDABLE ?= pedestrian-ssdlite mobilenetv2-torchvision
INSTALLED := $(VENV)/.installed
# The Ultralytics package's own environment (requirements-ultralytics.txt): the tests export real YOLO graphs.
ULTRALYTICS_VENV ?= .venv-ultralytics
ULTRALYTICS := $(ULTRALYTICS_VENV)/.installed
# Extra `mzconvert build` options, e.g. BUILD_ARGS="--out /tmp/d --build-dir /tmp/b" (used by bench/make_all.py).
BUILD_ARGS ?=

.PHONY: install ultralytics-env demo test test-fast lint all clean matrix release $(addprefix build-,$(BUILDABLE))

install: $(INSTALLED)

$(INSTALLED): pyproject.toml requirements-tools.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test,torch]'
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -r requirements-tools.txt
	touch $@

ultralytics-env: $(ULTRALYTICS)

$(ULTRALYTICS): requirements-ultralytics.txt requirements-yolov5.txt
	test -x $(ULTRALYTICS_VENV)/bin/python || $(PYTHON) -m venv $(ULTRALYTICS_VENV)
	$(ULTRALYTICS_VENV)/bin/pip install --disable-pip-version-check -q -r requirements-ultralytics.txt
	$(ULTRALYTICS_VENV)/bin/pip install --disable-pip-version-check -q --no-deps -r requirements-yolov5.txt
	touch $@

# The example image of NXP's SSDLite model card, and a real COCO val image with people in it.
DEMO_IMAGES := $(if $(MIRROR),$(MIRROR)/nxp-example_input.jpg $(MIRROR)/coco/val2017/000000183709.jpg)

demo: install
	$(MZ) build pedestrian-ssdlite
	$(if $(DEMO_IMAGES),$(MZ) predict pedestrian-ssdlite --variant float32 --variant int8 $(DEMO_IMAGES))
	cd dist/pedestrian-ssdlite && md5sum -c --quiet MD5SUMS && echo "dist/pedestrian-ssdlite: MD5SUMS verified"

# A file's tests share module fixtures (a model built once), so the files, not the tests, are spread over the cores;
# at most 4: more would wait on the longest file (11 minutes here), and each holds TensorFlow in memory.
PARALLEL := -n auto --maxprocesses 4 --dist loadfile

test: install ultralytics-env lint
	ULTRALYTICS_PYTHON=$(abspath $(ULTRALYTICS_VENV))/bin/python $(BIN)/python -m pytest -q $(PARALLEL)

# The tests without the real models and converters (marked slow): about 8 minutes on 2 cores (14 in one process).
test-fast: install lint
	$(BIN)/python -m pytest -q -m "not slow" $(PARALLEL)

lint: install
	$(BIN)/ruff check mzconvert tests bench

all: $(addprefix build-,$(BUILDABLE))

$(addprefix build-,$(BUILDABLE)): build-%: install
	$(MZ) build $* $(BUILD_ARGS)

release: all
	$(MZ) release --all

matrix: install
	$(MZ) matrix

clean:
	rm -rf build dist
