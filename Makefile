# dicom-node: the two commands of the README.
#   make run    install everything (system packages included) and start the node with ./config.toml
#   make test   install everything and run the whole test suite (what .ci/run calls)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= config.toml

# Debian packages: DCMTK (test clients, storescp), Orthanc (a real PACS), dicom3tools (dciodvfy), openssl (TLS tests),
# mricron-data (the Colin27 head MRI and its label maps, for the synthetic training data), g++ (torch.compile of
# the fp32 encoder, which the shipped config.toml asks for: 0.8 s a slice against 1.4-2.1 eager on 2 cores),
# postgresql (the index's tests run on a real PostgreSQL server too; its binaries are not on PATH).
APT_PACKAGES := dcmtk orthanc dicom3tools openssl mricron-data g++ postgresql
APT_TOOLS    := storescu Orthanc dciodvfy openssl g++
APT_FILES    := /usr/share/mricron/templates/ch2better.nii.gz

.PHONY: run test install system-packages benchmark clean

run: install
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

test: install
	$(PY) -m pytest

# pydicom-seg (a second reader of our SEGs in the tests) needs pydicom 2 and numpy 1: its own small venv.
SEG_VENV := .venv-pydicomseg

install: system-packages $(VENV)/.installed $(SEG_VENV)/.installed

system-packages:
	@missing=""; for tool in $(APT_TOOLS); do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	for file in $(APT_FILES); do test -f $$file || missing="$$missing $$file"; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages ($$missing missing): $(APT_PACKAGES)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]"
	touch $@

$(SEG_VENV)/.installed:
	test -x $(SEG_VENV)/bin/python || $(PYTHON) -m venv $(SEG_VENV)
	$(SEG_VENV)/bin/python -m pip install --disable-pip-version-check -q "pydicom<3" "pydicom-seg==0.4.1" "numpy<2"
	touch $@

benchmark: install
	$(PY) -m benchmarks.ingest --repeats 3 --json benchmarks/results/ingest.json

clean:
	rm -rf $(VENV) $(SEG_VENV) build *.egg-info .pytest_cache
