"""Interoperability with other ecosystems (Hugging Face Llama layout now; GGUF later)."""
