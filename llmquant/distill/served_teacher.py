"""Self-distillation from a served original (`llmquant distill --self Q --teacher-endpoint URL`):
the original runs behind any OpenAI-compatible server that returns prompt log-probs (`llmquant
serve`, vLLM), possibly on another machine, and its top-k log-probs on the training windows fill
the self-distillation's teacher cache once. The original never has to fit in this machine's
memory beside the student.

What a served teacher cannot give: its decoder layers' outputs (so no block-wise phase), more
than 20 log-probs per token (the API's limit), and full log-probs for verification.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from llmquant.config.self_distill import SelfDistillConfig
from llmquant.distill.teacher_cache import ENDPOINT_MAX_K, TeacherCache, fill_from_endpoint
from llmquant.errors import InvalidConfigError


def served_teacher_settings(settings: dict) -> dict:
    """The self-distillation settings with a served teacher: block_steps default to 0 (and may
    not be more), top_k to the endpoint's limit; the cross-entropy loss, which uses no teacher, is
    refused so that a run never silently ignores the endpoint."""
    settings = dict(settings)
    if settings.get("block_steps"):
        raise InvalidConfigError("The block-wise phase matches the original's decoder-layer outputs, which a served "
                                 "teacher does not return: use block_steps 0 (--block-steps 0) with a teacher "
                                 "endpoint, or give the original model itself.")
    if settings.get("loss") == "ce":
        raise InvalidConfigError("The cross-entropy loss (--self-loss ce) trains without a teacher: drop the teacher "
                                 "endpoint, or use the kl loss.")
    # fill_from_endpoint refuses it too, but only after the models load: refuse it first.
    if settings.get("top_k") is not None and settings["top_k"] > ENDPOINT_MAX_K:
        raise InvalidConfigError(f"An OpenAI-compatible endpoint returns at most {ENDPOINT_MAX_K} log-probs per token; "
                                 f"got top_k {settings['top_k']}.")
    if settings.get("steps") == 0:
        raise InvalidConfigError("With a served teacher only the end-to-end phase runs: steps must be > 0.")
    settings["block_steps"] = 0
    if settings.get("top_k") is None:
        settings["top_k"] = ENDPOINT_MAX_K
    return settings


def served_teacher_cache(base_url: str, model: str | None, tokenizer, windows: Tensor, work: Path,
                         cfg: SelfDistillConfig, progress: bool) -> str:
    """Fill `work`'s teacher cache from the endpoint (kept when a resumed run finds it); returns
    the teacher's name for the report ("<model> at <url>")."""
    from llmquant.distill.self_distill import TEACHER_CACHE

    folder = work / TEACHER_CACHE
    if folder.exists():  # run_self_distill checks that it holds these windows at this top_k
        return TeacherCache.open(folder).manifest["teacher"]
    work.mkdir(parents=True, exist_ok=True)
    cache = fill_from_endpoint(base_url, tokenizer, windows, folder, model=model, k=cfg.top_k, progress=progress)
    return cache.manifest["teacher"]
