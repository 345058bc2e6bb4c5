"""Inference: the generation Engine (KV cache, batched sampling, streaming)."""
from ownllm.inference.engine import Engine, SamplingParams

__all__ = ["Engine", "SamplingParams"]
