# Two commands do everything on a fresh Debian/Ubuntu machine:
#   make demo   set up, then run the main job on generated data (`viewpipe demo`: pretrain, box update, scores)
#   make test   set up, then run the test suite
# Setup installs what is missing: ffcv's system libraries (apt), a virtual environment in .venv,
# and `pip install -e .[all]` into it (re-run only when pyproject.toml changes).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps demo test bench clean quality-kit

setup: $(VENV)/.installed

system-deps:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "installing ffcv's system libraries: $(APT_PACKAGES)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml | system-deps
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[all]"
	@touch $@

demo: setup
	$(VENV)/bin/viewpipe demo

bench: setup
	$(VENV)/bin/viewpipe bench

test: setup
	$(PY) -m pytest -q

# the CIFAR-10 quality table on a lent GPU machine (no network there): .dkq/ holds the data and the wheels it lacks;
# carry .dkq and run `bash docs/quality-on-gpu.sh` there (see docs/quality.md)
CIFAR ?= ../shared/data/cifar10_jpeg/cifar10_jpeg.npz
quality-kit:
	mkdir -p .dkq/wheels && cp $(CIFAR) .dkq/
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		--platform manylinux_2_17_x86_64 --platform any -d .dkq/wheels omegaconf tensorboardX pyyaml tqdm matplotlib
	rm -f .dkq/wheels/numpy-*  # the machine has its own, which its torch was built against
	@du -sh .dkq

clean:
	$(VENV)/bin/viewpipe state clean 2>/dev/null || true
	rm -rf $(VENV) build *.egg-info
