"""ownllm: build, align, ground and serve your own LLM on hardware you have.

The flow (see README): tokenizer -> pretrain -> (sft -> reward -> ppo|dpo|grpo) -> generate/serve.
The public API is re-exported here; each module's docstring says where it sits in that flow.
"""
from ownllm.errors import OwnLLMError

__version__ = "0.1.0"
__all__ = ["OwnLLMError", "__version__"]
