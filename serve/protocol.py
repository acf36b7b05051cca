"""OpenAI request bodies for /v1/completions and /v1/chat/completions, and their sampling params.

Field names, types, defaults and limits follow the OpenAI API reference; `top_k`,
`stop_token_ids` and `ignore_eos` are the extensions vLLM also accepts. Unknown fields are
ignored (as vLLM does), so that clients that send newer fields still work; fields we cannot
honour (tools, response formats, logit_bias, suffix, best_of > n) are refused with a 400 that
names them instead of being silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from llmquant.serve.sampling import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, InvalidRequestError, SamplingParams

MAX_N = 16
# OpenAI's legacy completions API stops at 5; vLLM accepts up to 20 (its default max_logprobs),
# and a served distillation teacher (llmquant distill --teacher-endpoint) needs them: as vLLM.
MAX_COMPLETION_LOGPROBS = MAX_TOP_LOGPROBS

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenIds = list[Annotated[int, Field(ge=0)]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    stop: Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)], None] = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool = False
    seed: StrictInt | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported by this server.", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true.", "stream_options")

    def sampling_params(self, *, max_tokens: int | None, logprobs: bool, top_logprobs: int,
                        prompt_logprobs: bool = False) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),  # vLLM's -1 and 0 both mean "no limit"
            seed=self.seed,
            stop=tuple(s for s in stop if s),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_Common):
    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)], Annotated[TokenIds, Field(min_length=1)],
                  Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # the OpenAI default for completions
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise InvalidRequestError("suffix is not supported by this server.", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported by this server.", "best_of")
        if self.max_tokens == 0 and not (self.echo and self.logprobs is not None):
            raise InvalidRequestError("max_tokens 0 is only allowed with echo and logprobs (prompt scoring).",
                                      "max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)

    def params(self) -> SamplingParams:
        self.refuse_unsupported()
        wants = self.logprobs is not None
        return self.sampling_params(max_tokens=self.max_tokens, logprobs=wants, top_logprobs=self.logprobs or 0,
                                    prompt_logprobs=self.echo and wants)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise InvalidRequestError("tools are not supported by this server.", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequestError("Only response_format {'type': 'text'} is supported.", "response_format")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true.", "top_logprobs")

    def chat_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for "system"; chat templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def params(self) -> SamplingParams:
        self.refuse_unsupported()
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens=max_tokens, logprobs=self.logprobs,
                                    top_logprobs=self.top_logprobs or 0)
