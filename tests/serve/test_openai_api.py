"""The HTTP API through the official `openai` client against a real `llmquant serve` process."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

MODEL = "tiny"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model" and models[0].owned_by == "llmquant"


def test_completion_usage_matches_tokenizer(client, tok):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(tok(prompt).input_ids)
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].finish_reason == "length"


def test_completion_stream_equals_non_stream(client):
    args = dict(model=MODEL, prompt="def main():", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_raw_stream_ends_with_done(server):
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True}).encode()
    req = urllib.request.Request(server.base_url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_chat_completion_and_stream(client, tok):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    prompt_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_with_seed_are_reproducible(client):
    args = dict(model=MODEL, messages=MESSAGES, max_tokens=10, n=3, seed=11, temperature=1.0,
                extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**args)
    b = client.chat.completions.create(**args)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1
    assert a.usage.completion_tokens == 30


def test_stop_sequence(client):
    args = dict(model=MODEL, prompt="Python's documentation says that exceptions", max_tokens=30, temperature=0,
                extra_body={"ignore_eos": True})
    free = client.completions.create(**args).choices[0].text
    stop = free[10:12]
    r = client.completions.create(stop=[stop, "never-there"], **args)
    assert r.choices[0].text == free[:free.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_completion_echo_logprobs_scores_the_prompt(client, tok):
    prompt = "import os\nimport sys\n"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    ids = tok(prompt).input_ids
    assert r.choices[0].text == prompt
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the top one
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_penalties_and_user_accepted(client):
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=20, temperature=0,
                                  frequency_penalty=2.0, presence_penalty=1.0, user="tester",
                                  extra_body={"ignore_eos": True})
    base = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert r.choices[0].text != base.choices[0].text


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=3.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(logprobs=21), "logprobs"),  # at most 20, as vLLM (OpenAI: 5)
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(presence_penalty=5), "presence_penalty"),
])
def test_invalid_parameters_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", **kwargs)
    err = info.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_prompt_over_context_is_400(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.completions.create(model=MODEL, prompt=[5] * 300, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256") as info:
        client.completions.create(model=MODEL, prompt=[5] * 100, max_tokens=200)
    assert info.value.body["param"] == "max_tokens"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-5", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_malformed_bodies_are_400_not_500(server):
    for body in (b"{not json", b"[]", b'{"prompt": {"a": 1}}', b'{"messages": "hi"}', b'{"prompt": [99999999]}'):
        for path in ("/v1/completions", "/v1/chat/completions"):
            req = urllib.request.Request(server.base_url + path, body, {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=30)
            assert info.value.code == 400, (path, body)
            err = json.loads(info.value.read())["error"]
            assert set(err) == {"message", "type", "param", "code"}


def test_health_and_metrics(server, client):
    client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    with urllib.request.urlopen(server.base_url + "/health", timeout=5) as r:
        assert json.loads(r.read())["status"] == "ok"
    assert server.metric("llmquant:time_to_first_token_seconds_count") >= 1
    assert server.metric("llmquant:generation_tokens_total") >= 2
    assert server.metric("llmquant:num_requests_running") == 0
    assert server.metric("llmquant:num_requests_waiting") == 0
    assert server.metric('llmquant:requests_total{endpoint="/v1/completions",status="200"}') >= 1
    assert server.metric('llmquant:requests_total{endpoint="/v1/chat/completions",status="404"}') >= 1
