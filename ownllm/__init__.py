"""ownllm: build, align, ground and serve your own LLM on hardware you have.

The flow: tokenizer -> pretrain -> (sft -> reward -> ppo|dpo|grpo) -> generate/serve, or import a
model and take it through the same stages. Each module's docstring says where it sits in that flow;
the entry points are the stage functions (ownllm.train.*), ownllm.inference.Engine and the CLI.
"""
from ownllm.errors import OwnLLMError

__version__ = "0.1.0"
__all__ = ["OwnLLMError", "__version__"]
