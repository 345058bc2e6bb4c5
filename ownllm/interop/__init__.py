"""Interoperability with other ecosystems: Hugging Face Llama directories (hf.py) and GGUF files
(gguf.py), both written by `ownllm export`."""
