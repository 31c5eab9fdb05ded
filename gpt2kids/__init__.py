"""gpt2kids: a from-scratch GPT-2 for fine-tuning on Indonesian children's stories."""

from gpt2kids.config import GPT2Config
from gpt2kids.errors import UserError
from gpt2kids.model import GPT2

__all__ = ["GPT2", "GPT2Config", "UserError"]
__version__ = "0.1.0"
