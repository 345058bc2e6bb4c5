"""Evaluation: held-out bits per byte, the task suite, RAG, the agent, extraction and preferences."""
