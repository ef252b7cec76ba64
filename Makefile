# The README's two commands: `make serve` (install, build the demo checkpoint, serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel a fresh machine carries; a GPU host sets e.g. TORCH_SPEC="torch==2.13.0" with its own index.
TORCH_SPEC ?= torch==2.13.0
OMNI_MODEL_ROOT ?= $(HOME)/.cache/omni-triton/models
export OMNI_MODEL_ROOT
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: install demo serve test lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" -e ./client
	touch $@

# the checkpoints model_repository/'s config.pbtxt files name: the trained 64x64 FLUX demo (committed,
# copied: a model name must resolve inside the model root), and a tiny random one per other family
demo: install
	mkdir -p $(OMNI_MODEL_ROOT)
	rm -rf $(OMNI_MODEL_ROOT)/flux-shapes && cp -r demo/flux-shapes $(OMNI_MODEL_ROOT)/flux-shapes
	$(PY) -m omni_backend.testing.tiny --family qwen_image --out $(OMNI_MODEL_ROOT)/tiny-qwen-image
	$(PY) -m omni_backend.testing.tiny --family qwen_image_edit --out $(OMNI_MODEL_ROOT)/tiny-qwen-image-edit
	$(PY) -m omni_backend.testing.tiny --family wan22_t2v --out $(OMNI_MODEL_ROOT)/tiny-wan22-t2v
	$(PY) -m omni_backend.testing.tiny --family wan22_i2v --out $(OMNI_MODEL_ROOT)/tiny-wan22-i2v
	$(PY) -m omni_backend.testing.tiny --family longcat_image --out $(OMNI_MODEL_ROOT)/tiny-longcat-image

serve: demo
	$(PY) -m omni_backend.serve --model-repository model_repository \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: install
	$(VENV)/bin/ruff check omni_backend client tests benchmarks
	$(PY) -m pytest -q -ra

bench: install
	$(PY) -m benchmarks.overhead
	$(PY) -m benchmarks.overhead --family qwen_image
	$(PY) -m benchmarks.overhead --family wan22_t2v --size 256 --frames 9
	$(PY) -m benchmarks.step_batching
