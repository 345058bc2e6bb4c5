"""Interoperability with other ecosystems: Hugging Face Llama layout (export, parity tests)."""
