# stasis: every target that needs the machine prepared depends on `provision` (idempotent, seconds
# when everything is present).
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_SRC := proto/v1/stasis.proto

.PHONY: provision proto proto-check test unit e2e demo lint bench clean

provision:
	bash scripts/provision.sh

# Regenerate the gRPC code. The virtual include path makes generated imports read
# `from stasis.proto.v1 import ...`, matching the installed package layout.
proto:
	rm -rf .proto-out && mkdir -p .proto-out
	$(PY) -m grpc_tools.protoc -Istasis/proto=proto --python_out=.proto-out --pyi_out=.proto-out \
		--grpc_python_out=.proto-out stasis/proto/v1/stasis.proto
	cp .proto-out/stasis/proto/v1/*.py .proto-out/stasis/proto/v1/*.pyi proto/v1/
	rm -rf .proto-out

# Fails when the committed generated code differs from what `make proto` produces.
proto-check: proto
	git diff --exit-code -- proto/v1 || { echo "generated code is stale: run 'make proto' and commit" >&2; exit 1; }

lint:
	$(VENV)/bin/ruff check .

test: provision proto-check lint
	$(PY) -m pytest -q -ra tests

unit: provision
	$(PY) -m pytest -q -ra -m "not e2e" tests

e2e: provision
	$(PY) -m pytest -q -ra -m e2e tests

demo: provision
	$(PY) -m stasis.demo

bench: provision
	$(PY) bench/migrate_vs_podman.py

clean:
	rm -rf .proto-out .pytest_cache
