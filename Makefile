# torchserve-concept-explainer: the two commands a user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
MODEL ?= shapes
SAMPLE ?= $(firstword $(sort $(wildcard data/shapes/test/star/*.png)))

.PHONY: venv demo build serve serve-kserve kserve-storage query stop test prometheus chromium test-unit test-integration soak soak-kserve latency monitor-overhead bench bench-smoke model-224 real-data lint docs docs-figures clean

# The onnxruntime flavour, cpu or gpu (exactly one is installed; switching uninstalls the other).
FLAVOUR ?= cpu

venv: $(VENV)/.installed-$(FLAVOUR)

$(VENV)/.installed-$(FLAVOUR): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if [ -n "$$(ls $(VENV)/.installed-* 2>/dev/null | grep -v '\.installed-$(FLAVOUR)$$')" ]; then \
	  echo "switching the onnxruntime flavour to $(FLAVOUR)"; \
	  $(PY) -m pip uninstall --quiet -y onnxruntime onnxruntime-gpu; rm -f $(VENV)/.installed-*; fi
	$(PY) -m pip install --quiet -e ".[dev,bench,kserve,$(FLAVOUR)]"
	touch $@

## Render data, train, export, archive model_store/shapes.mar, serve it, ask it one question.
demo: build serve query
	$(BIN)/concept-explainer demo-report --model $(MODEL)
	@echo
	@echo "TorchServe is running on 127.0.0.1:8080 (inference), :8081 (management), :8082 (metrics)."
	@echo "The inference key is in key_file.json. Stop the server with: make stop"

build: venv
	# Archived only when every validity check passes (docs/validity.md, Method 1).
	$(BIN)/concept-explainer build-demo --model-store model_store --name $(MODEL)

serve: venv
	-@$(BIN)/torchserve --stop --foreground >/dev/null 2>&1
	$(BIN)/torchserve --start --ncs --ts-config config.properties --log-config deploy/torchserve-log4j2.xml \
		--model-store model_store \
		--models $(MODEL)=$(MODEL).mar > logs-torchserve.out 2>&1

query: venv
	$(BIN)/concept-explainer query --model $(MODEL) --image $(SAMPLE) --endpoint predictions

## The same archive on KServe's Python model server (no TorchServe, no Java), on loopback.
KSERVE_PORT ?= 8085
serve-kserve: venv
	$(BIN)/concept-explainer-kserve --mar model_store/$(MODEL).mar --http-port $(KSERVE_PORT)

## KServe's TorchServe runtime: lay out the archive as its storageUri expects (docs/deployment.md).
kserve-storage: venv
	$(BIN)/concept-explainer kserve-storage --mar model_store/$(MODEL).mar --out build/kserve-storage

stop:
	-$(BIN)/torchserve --stop --foreground

## The whole test suite (unit, handler with a mock context, integration against a real TorchServe
## and a real Prometheus: installed with apt-get where missing and possible, else its test skips).
test: venv prometheus chromium lint
	$(PY) -m pytest -q

## The documentation site (docs/, MkDocs with the Material theme) into build/site; strict, as the tests build it.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -f docs/mkdocs.yml
	@echo "documentation site: build/site/index.html"

## The README's headline table and docs/benchmarks.md's tables from bench/results/latest.json (make bench).
docs-figures: venv
	$(PY) -m bench.figures

## Lint (ruff) and types (mypy) over handlers/, export/ and bench/, configured in pyproject.toml.
lint: venv
	$(PY) -m ruff check handlers export bench
	$(PY) -m mypy

prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1)) \
	    || echo "could not install prometheus; the Prometheus integration test will be skipped"; \
	  else echo "prometheus not installed and apt-get not usable as root; its test will be skipped"; fi; }

## Headless Chromium for the HTML report's browser test (Debian's package), installed like Prometheus.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1)) \
	    || echo "could not install chromium; the report's browser test will be skipped"; \
	  else echo "chromium not installed and apt-get not usable as root; the report's browser test will be skipped"; fi; }

test-unit: venv
	$(PY) -m pytest -q tests/unit tests/handler

test-integration: venv
	$(PY) -m pytest -q tests/integration

## Against the running demo server (make demo): 2 minutes of 8 clients; latency side by side.
soak: venv
	$(PY) -m bench.soak --model $(MODEL) --image $(SAMPLE) --seconds 120 --clients 8

## The same soak on the KServe door (its own server on a free loopback port), then SIGKILL and a restart.
soak-kserve: venv
	$(PY) -m bench.kserve_soak --mar model_store/$(MODEL).mar --image $(SAMPLE) --seconds 120 --clients 8 \
		--out bench/results/soak-kserve.json

latency: venv
	$(PY) -m bench.latency --model $(MODEL) --image $(SAMPLE) --requests 200

## Benchmarks (python -m bench.run): the demo model and the trained ResNet-18-sized model at
## 224 px (make model-224, built on first use: about 45 minutes on 2 cores), each against a real
## TorchServe.
BUNDLE := build/$(MODEL)/bundle/manifest.json
$(BUNDLE):
	$(MAKE) build

## LARGE: the second size's folder. LARGE=build/bench/resnet18_224 benchmarks the untrained
## timing model instead (bench/build_model.py builds it when missing, 7 to 10 minutes): real
## latency, bytes and memory, explanations without meaning.
MODEL_224 ?= build/bench/resnet18_224_trained
LARGE ?= $(MODEL_224)
bench: venv $(BUNDLE) $(if $(filter $(MODEL_224),$(LARGE)),$(MODEL_224)/build-report.json)
	$(PY) -m bench.run --bundle build/$(MODEL)/bundle --classifier build/$(MODEL)/classifier --data data/$(MODEL) \
		--large $(LARGE)

## A trained 224 px model (ResNet-18-sized, every explanation artifact), built once and kept;
## rm -r $(MODEL_224) rebuilds it (a classifier already trained there with the same counts is
## kept when only the later steps are missing). On 2 cores the classifier trains in about
## 12 minutes (bf16), then the explanation artifacts are fitted.
model-224: venv $(MODEL_224)/build-report.json

$(MODEL_224)/build-report.json:
	$(PY) -m bench.build_model --out $(MODEL_224) --trained --reuse-classifier

## Tiny request counts, the demo size only: checks the harness, not a figure.
bench-smoke: venv $(BUNDLE)
	$(PY) -m bench.run --bundle build/$(MODEL)/bundle --classifier build/$(MODEL)/classifier --data data/$(MODEL) \
		--smoke --no-large --out build/bench/smoke

## Cost of concept monitoring on /predictions: the demo archive with monitor_fraction 0 vs 1.
monitor-overhead: venv
	$(PY) -m bench.monitor_overhead --bundle build/shapes/bundle --image $(SAMPLE)

## The whole offline pipeline on real images the project did not render: scikit-learn's
## handwritten digits (1,347 training, 450 held-out scans at 32 px). Prints each step's
## validity report; the archive is built even if checks fail, and says which.
DIGITS := $(BIN)/concept-explainer
real-data: venv
	$(DIGITS) digits --out data/digits
	test -f build/digits/classifier/classifier.json || \
	  $(DIGITS) train --data data/digits --out build/digits/classifier --epochs 12 --batch-size 64
	$(DIGITS) export --classifier build/digits/classifier --out build/digits/bundle --name digits
	$(DIGITS) concepts --bundle build/digits/bundle --classifier build/digits/classifier --data data/digits
	$(DIGITS) cladec --bundle build/digits/bundle --classifier build/digits/classifier --data data/digits
	$(DIGITS) features --bundle build/digits/bundle --classifier build/digits/classifier --data data/digits
	$(DIGITS) archive --bundle build/digits/bundle --name digits --model-store model_store --accept-failed-checks

clean:
	rm -rf build model_store/*.mar logs logs-torchserve.out key_file.json .pytest_cache
