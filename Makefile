# kvmd: two commands for a new machine (see README.md): `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
LISTEN ?=
STAMP := $(VENV)/.installed

.PHONY: run test install lint typecheck proto pytest bench bench-quick soak clean system-install uninstall

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

CLIENT := clients/python

# Reinstall (editable) whenever the build inputs change: the cffi binding or the protos.
# Both distributions in one pip run: the daemon's dependency on kvmd-client is met by the
# client of this checkout (clients/python, which generates kvmd_proto from proto/), never by
# an index.
$(STAMP): $(VENV)/bin/python pyproject.toml setup.py $(CLIENT)/pyproject.toml $(CLIENT)/setup.py kvmd/kvm/_build.py kvmd/kvm/_names.py $(wildcard kvmd/kvm/c/*) $(wildcard proto/*.proto)
	@# Once, from a venv of before the split: kvmd-grpc then shipped kvmctl itself, and pip
	@# replacing it would delete the kvmctl that kvmd-client has just installed.
	if $(PIP) show -f kvmd-grpc 2>/dev/null | grep -q 'bin/kvmctl$$'; then \
		$(PIP) uninstall -q -y kvmd-grpc; fi
	$(PIP) install -q -e ./$(CLIENT) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/kvmd $(LISTEN)

# buf (npm @bufbuild/buf, pinned in package-lock.json) lints the contract and checks it
# against the last released proto (buf.yaml; proto-released/README.md: cutting a release).
BUF := node_modules/.bin/buf
PROTO_BASELINE := proto-released/v0.1

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(BUF)

proto: $(BUF)
	$(BUF) lint
	$(BUF) breaking --against $(PROTO_BASELINE)

lint: install
	$(VENV)/bin/ruff check kvmd $(CLIENT) tests benchmarks setup.py

typecheck: install
	$(VENV)/bin/mypy kvmd $(CLIENT)/kvmd_client

pytest: install $(BUF)
	$(VENV)/bin/pytest -q

test: lint typecheck proto pytest

bench: install
	$(PY) benchmarks/run_all.py

# Long runs, not part of `make test` (see README "Limits"): the load workload for
# SOAK_SECONDS (default 10 minutes) with a report of calls/s, p50/p99 per RPC and the
# daemon's RSS slope, then the fuzz tests with FUZZ_FACTOR times their CI examples.
SOAK_SECONDS ?= 600
FUZZ_FACTOR ?= 10
soak: install
	$(PY) benchmarks/soak.py --duration $(SOAK_SECONDS)
	KVMD_FUZZ_PROFILE=soak KVMD_FUZZ_SOAK_FACTOR=$(FUZZ_FACTOR) $(VENV)/bin/pytest -q -s \
		-p no:cacheprovider --timeout 0 tests/fuzz

# The figures of the README's benchmark table, in short runs (under 3 minutes).
bench-quick: install
	$(PY) benchmarks/run_all.py --quick

# Install as a systemd service (a virtualenv under /opt/kvmd, unit, config); idempotent.
system-install:
	deploy/install.sh

uninstall:
	deploy/install.sh --uninstall

clean:
	rm -rf $(VENV) build *.egg-info kvmd/kvm/_kvm_cffi* \
		$(CLIENT)/build $(CLIENT)/*.egg-info $(CLIENT)/kvmd_proto node_modules
