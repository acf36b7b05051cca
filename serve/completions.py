"""POST /v1/completions: the legacy text API, with `echo` + `logprobs` for scoring prompts
(lm-evaluation-harness's `local-completions`, perplexity over HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from llmquant.serve.choices import (
    SSE_DONE,
    TokenText,
    check_token_ids,
    new_id,
    now,
    raise_if_aborted,
    sse,
    submit_all,
    usage,
)
from llmquant.serve.fanout import Fanout
from llmquant.serve.protocol import CompletionRequest


@dataclass
class _Logprobs:
    """The legacy logprobs object: parallel lists over tokens, `text_offset` into the choice text."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, text: str, offset: int, logprob: float | None, top: dict[str, float] | None) -> int:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)
        return offset + len(text)

    def to_dict(self) -> dict:
        return dict(tokens=self.tokens, token_logprobs=self.token_logprobs, top_logprobs=self.top_logprobs,
                    text_offset=self.text_offset)


@dataclass
class _Choice:
    text: str = ""
    offset: int = 0  # characters of this choice's text so far (for text_offset)
    logprobs: _Logprobs | None = None
    finish_reason: str | None = None
    generated: int = 0
    started: bool = False  # an event has arrived (with echo, the prompt goes before it)


def _add_prompt(choice: _Choice, text: str, prompt_ids: list[int], prompt_lp, token_text: TokenText) -> str:
    """Echo: the prompt's text first, with its tokens' logprobs when asked."""
    if choice.logprobs is not None and prompt_lp is not None:
        for t, entry in zip(prompt_ids, prompt_lp):
            s = token_text(t)
            top = None if entry is None else {token_text(t): entry[0], **{token_text(i): v for i, v in entry[1]}}
            choice.offset = choice.logprobs.add(s, choice.offset, None if entry is None else entry[0], top)
    else:
        choice.offset += len(text)
    return text


def _add_token(choice: _Choice, event, token_text: TokenText) -> None:
    if choice.logprobs is not None and event.token_id is not None:
        s = token_text(event.token_id)
        top = {s: event.logprob, **{token_text(i): v for i, v in event.top_logprobs}}
        choice.logprobs.add(s, choice.offset, event.logprob, top)
    choice.offset += len(event.text)


def _consume(choice: _Choice, event, echo_text: str | None, prompt_ids: list[int], token_text: TokenText) -> str:
    """Apply one event to its choice; returns the text it adds (the echoed prompt first)."""
    text = ""
    if echo_text is not None and not choice.started:
        text = _add_prompt(choice, echo_text, prompt_ids, event.prompt_logprobs, token_text)
    choice.started = True
    _add_token(choice, event, token_text)
    choice.generated = event.num_generated
    choice.finish_reason = event.finish_reason or choice.finish_reason
    return text + event.text


async def create_completion(req: CompletionRequest, state, request):
    engine, tokenizer = state.engine, state.engine.tokenizer
    params = req.params()
    raw = req.prompts()
    prompts = [check_token_ids(p, state.vocab_size) if isinstance(p, list) else
               tokenizer(p, add_special_tokens=True).input_ids for p in raw]
    # Echo returns a text prompt as sent; token-id prompts as their decoded text.
    prompt_texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in raw] if req.echo else []
    token_text = TokenText(tokenizer) if req.logprobs is not None or req.echo else None
    fan = Fanout(engine, state.metrics)
    submit_all(fan, prompts, req.n, params)
    ids = dict(id=new_id("cmpl"), created=now(), model=state.model_name)
    choices = {i: _Choice(logprobs=_Logprobs() if req.logprobs is not None else None)
               for i in range(len(prompts) * req.n)}
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(fan, req, prompts, prompt_texts, choices, ids, token_text, prompt_tokens,
                                         include_usage, request), media_type="text/event-stream")
    try:
        async for index, event in fan.events(request):
            p = index // req.n
            choices[index].text += _consume(choices[index], event, prompt_texts[p] if req.echo else None, prompts[p],
                                            token_text)
            raise_if_aborted(event.finish_reason)
    finally:
        fan.cancel()
    return {**ids, "object": "text_completion",
            "choices": [{"index": i, "text": c.text, "logprobs": c.logprobs.to_dict() if c.logprobs else None,
                         "finish_reason": c.finish_reason} for i, c in sorted(choices.items())],
            "usage": usage(prompt_tokens, sum(c.generated for c in choices.values()))}


async def _stream(fan: Fanout, req: CompletionRequest, prompts, prompt_texts, choices, ids, token_text,
                  prompt_tokens: int, include_usage: bool, request):
    extra = {"usage": None} if include_usage else {}
    try:
        async for index, event in fan.events(request):
            choice = choices[index]
            p = index // req.n
            start = len(choice.logprobs.tokens) if choice.logprobs else 0
            text = _consume(choice, event, prompt_texts[p] if req.echo else None, prompts[p], token_text)
            if not text and event.finish_reason is None and choice.logprobs is None:
                continue
            logprobs = None
            if choice.logprobs is not None:  # only the entries this event added
                logprobs = {k: v[start:] for k, v in choice.logprobs.to_dict().items()}
            yield sse({**ids, "object": "text_completion",
                       "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                    "finish_reason": event.finish_reason}], **extra})
        if include_usage:
            yield sse({**ids, "object": "text_completion", "choices": [],
                       "usage": usage(prompt_tokens, sum(c.generated for c in choices.values()))})
        yield SSE_DONE
    finally:
        fan.cancel()

