"""POST /v1/chat/completions: messages through the model's chat template."""

from __future__ import annotations

from fastapi.responses import StreamingResponse

from llmquant.serve.choices import SSE_DONE, TokenText, new_id, now, raise_if_aborted, sse, submit_all, usage
from llmquant.serve.fanout import Fanout
from llmquant.serve.protocol import ChatCompletionRequest
from llmquant.serve.sampling import InvalidRequestError


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("This model has no chat template; use /v1/completions with a plain prompt.",
                                  "messages")
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # the template's own checks (roles, alternation) speak for the model
        raise InvalidRequestError(f"The model's chat template rejected the messages: {e}", "messages") from e
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


def _logprob_entry(token_text: TokenText, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    s = token_text(token_id)
    return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8")),
            "top_logprobs": [{"token": (t := token_text(i)), "logprob": v, "bytes": list(t.encode("utf-8"))}
                             for i, v in top]}


async def create_chat_completion(req: ChatCompletionRequest, state, request):
    tokenizer = state.engine.tokenizer
    params = req.params()
    prompt = chat_prompt_ids(tokenizer, req.chat_messages())
    token_text = TokenText(tokenizer) if req.logprobs else None
    fan = Fanout(state.engine, state.metrics)
    submit_all(fan, [prompt], req.n, params)
    ids = dict(id=new_id("chatcmpl"), created=now(), model=state.model_name)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(fan, req, ids, token_text, len(prompt), include_usage, request),
                                 media_type="text/event-stream")
    texts = {i: "" for i in range(req.n)}
    logprobs = {i: [] for i in range(req.n)}
    finish, generated = {}, {}
    try:
        async for index, event in fan.events(request):
            texts[index] += event.text
            if req.logprobs and event.token_id is not None:
                logprobs[index].append(_logprob_entry(token_text, event.token_id, event.logprob, event.top_logprobs))
            generated[index] = event.num_generated
            if event.finish_reason:
                finish[index] = event.finish_reason
            raise_if_aborted(event.finish_reason)
    finally:
        fan.cancel()
    return {**ids, "object": "chat.completion",
            "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                         "logprobs": {"content": logprobs[i]} if req.logprobs else None,
                         "finish_reason": finish.get(i)} for i in range(req.n)],
            "usage": usage(len(prompt), sum(generated.values()))}


async def _stream(fan: Fanout, req: ChatCompletionRequest, ids: dict, token_text, prompt_tokens: int,
                  include_usage: bool, request):
    extra = {"usage": None} if include_usage else {}
    base = {**ids, "object": "chat.completion.chunk"}
    generated: dict[int, int] = {}
    try:
        for i in range(req.n):  # the role comes first, as OpenAI sends it
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], **extra})
        async for index, event in fan.events(request):
            generated[index] = event.num_generated
            if not event.text and event.finish_reason is None and not req.logprobs:
                continue
            logprobs = None
            if req.logprobs and event.token_id is not None:
                logprobs = {"content": [_logprob_entry(token_text, event.token_id, event.logprob,
                                                       event.top_logprobs)]}
            delta = {"content": event.text} if event.text else {}
            yield sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": event.finish_reason}], **extra})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, sum(generated.values()))})
        yield SSE_DONE
    finally:
        fan.cancel()
