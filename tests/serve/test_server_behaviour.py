"""Server behaviour under load and misuse: concurrency, disconnects, API keys, a full queue,
graceful shutdown. Each uses a real `llmquant serve` process and the official client."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import openai
import pytest

MODEL = "tiny"


def _stream_tokens(client, max_tokens: int) -> int:
    stream = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=max_tokens,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    return [c for c in stream][-1].usage.completion_tokens


def test_32_concurrent_streams_beat_one_at_a_time(client):
    n, max_tokens = 32, 24
    t = time.perf_counter()
    for _ in range(4):
        assert _stream_tokens(client, max_tokens) == max_tokens
    sequential_tps = 4 * max_tokens / (time.perf_counter() - t)

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(_stream_tokens(client, max_tokens)))
               for _ in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    concurrent_tps = sum(results) / (time.perf_counter() - t)
    assert results == [max_tokens] * n
    assert concurrent_tps > sequential_tps, (concurrent_tps, sequential_tps)


def test_client_disconnect_frees_the_sequence(server):
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True})
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    received = b""
    while received.count(b"data: ") < 3:  # mid-stream
        received += sock.recv(4096)
    assert server.metric("llmquant:num_requests_running") == 1
    sock.close()
    deadline = time.monotonic() + 30
    while server.metric("llmquant:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("llmquant:num_requests_running") == 0
    assert server.metric('llmquant:sequences_finished_total{finish_reason="abort"}') >= 1


@pytest.fixture(scope="module")
def guarded(tiny_model_dir, start_server):
    """API key from the environment; a batch of one and a queue of one, to fill them."""
    return start_server(tiny_model_dir, "--served-model-name", MODEL, "--max-batch-size", "1", "--max-waiting", "1",
                        env={"LLMQUANT_API_KEY": "s3cret-key"})


def test_api_key_required(guarded):
    url = guarded.base_url + "/v1"
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=url, api_key=key or "x", max_retries=0).models.list()
        assert info.value.body["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=url, api_key="s3cret-key", max_retries=0)
    assert good.models.list().data[0].id == MODEL
    assert "s3cret-key" not in guarded.output()


def test_full_queue_answers_429(guarded):
    client = openai.OpenAI(base_url=guarded.base_url + "/v1", api_key="s3cret-key", max_retries=0, timeout=120)
    long = dict(model=MODEL, prompt="x", max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    running = client.completions.create(**long)
    next(iter(running))  # generating: the batch of 1 is full
    waiting = threading.Thread(target=lambda: client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"ignore_eos": True}))
    waiting.start()
    deadline = time.monotonic() + 30
    while guarded.metric("llmquant:num_requests_waiting") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert info.value.body["code"] == "server_busy"
    running.close()
    waiting.join(60)


def test_graceful_shutdown_finishes_in_flight(tiny_model_dir, start_server):
    srv = start_server(tiny_model_dir, "--served-model-name", MODEL)
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    try:
        stream = client.completions.create(model=MODEL, prompt="x", max_tokens=120, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        assert first.choices
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].usage.completion_tokens == 120  # the in-flight request ran to the end
        # uvicorn re-raises the signal once shut down, so the exit status reports SIGTERM.
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(openai.APIConnectionError):  # and nothing new is accepted
            client.models.list()
    finally:
        srv.stop()


def _held_port():
    """A real socket listening on a free local port (what another server would hold)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_a_port_in_use_fails_at_once_without_loading(tiny_model_dir):
    import os
    import subprocess
    import sys

    holder, port = _held_port()
    try:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "llmquant", "serve", str(tiny_model_dir), "--port", str(port)],
                              capture_output=True, text=True, timeout=120, env=os.environ.copy())
        elapsed = time.monotonic() - start
    finally:
        holder.close()
    err = proc.stderr
    assert proc.returncode == 2, err
    assert f"port {port}" in err and "already in use" in err and "--port" in err, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    # Nothing was loaded and nothing claimed to serve (the old order printed "serving ..." first).
    assert "loading the model" not in err and "serving" not in err, err
    assert elapsed < 20, elapsed


def test_the_port_is_bound_before_the_model_is_looked_at(tmp_path):
    """A model that does not exist is not even looked for when the port is taken: bind comes first."""
    from llmquant.serve.server import PortUnavailableError, serve

    holder, port = _held_port()
    try:
        with pytest.raises(PortUnavailableError, match=f"port {port} on 127.0.0.1 is already in use"):
            serve(str(tmp_path / "no-such-model"), port=port)
    finally:
        holder.close()
