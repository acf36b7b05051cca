"""Publishing to the Hugging Face Hub: `push` (one commit, created repo, model card)."""

from llmquant.hub.model_card import build_model_card
from llmquant.hub.push import PushResult, check_push_target, push

__all__ = ["PushResult", "build_model_card", "check_push_target", "push"]
