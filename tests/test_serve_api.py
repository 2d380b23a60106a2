"""`python -m llava_jax.serve` through the official `openai` client: answers, streaming, parameters, endpoints.

The server (tests/serve_helpers.py) is started once per session on 127.0.0.1. The reference for an
image question is `python -m llava_jax.run` itself (its stdout), with the same image, prompt and mmproj.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from serve_helpers import API_KEY, N_CTX, get, image_message, metric, server
from tiny_mmproj import drawing

IMG = drawing(90, 60, 1)
QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def srv():
    return server()


@pytest.fixture(scope="module")
def client(srv):
    return srv.client()


def chat(client, messages, **kw):
    return client.chat.completions.create(model="llava", messages=messages, **kw)


def test_image_chat_equals_run_cli(srv, client, tmp_path):
    path = tmp_path / "img.png"
    IMG.save(path)
    cli = subprocess.run([sys.executable, "-m", "llava_jax.run", "--mmproj", str(srv.mmproj), "--image", str(path),
                          "-p", QUESTION, "-n", "12", "--temp", "0", "-c", str(N_CTX)],
                         capture_output=True, text=True, timeout=600, check=True)
    expected = cli.stdout[:-1]  # run ends its answer with one newline
    r = chat(client, image_message(QUESTION, IMG), max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected
    assert expected.strip()  # a real answer, not an empty string
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 100  # the image's rows are counted
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"


def test_stream_pieces_join_to_the_whole_answer(client):
    whole = chat(client, image_message(QUESTION, IMG), max_tokens=12, temperature=0)
    chunks = list(chat(client, image_message(QUESTION, IMG), max_tokens=12, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_stream_ends_with_done(srv):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, headers={"X-Api-Key": API_KEY},
                      timeout=120) as r:
        lines = [x for x in r.iter_lines() if x]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_text_chat_max_tokens_and_stop(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = chat(client, messages, max_tokens=16, temperature=0).choices[0]
    words = full.message.content.split()
    assert len(words) >= 3, full.message.content
    short = chat(client, messages, max_tokens=2, temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    assert full.message.content.startswith(short.choices[0].message.content)
    stopped = chat(client, messages, max_tokens=16, temperature=0, stop=[" " + words[2]]).choices[0]
    assert stopped.message.content == full.message.content.split(" " + words[2])[0]
    assert stopped.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.95)
    a = chat(client, messages, seed=42, **kw).choices[0].message.content
    b = chat(client, messages, seed=42, **kw).choices[0].message.content
    others = {chat(client, messages, seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) >= 2  # other seeds draw other answers


def test_logprobs(client):
    r = chat(client, [{"role": "user", "content": "What is the capital of France?"}], max_tokens=6, temperature=0,
             logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(x <= 0 for x in tops)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy
        assert bytes(t.bytes).decode() == t.token


def test_completions_endpoint(client):
    r = client.completions.create(model="llava", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 5 and r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="llava", prompt="The capital of France is", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_models_health_metrics(srv, client):
    chat(client, [{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    health = get(srv, "/health", key=None)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    text = get(srv, "/metrics").text
    assert metric(text, "slots_total") == 4 and metric(text, "generation_tokens_total") > 0
    assert metric(text, "prompt_tokens_total") > 0 and metric(text, "time_to_first_token_seconds_count") > 0
    for name in ("requests_running", "requests_waiting", "slots_busy", "image_cache_hits_total", "image_cache_misses_total"):
        metric(text, name)
    assert 'llava_jax_requests_total{endpoint="chat",outcome="ok"}' in text


def test_tokenize_detokenize_round_trip(srv):
    h = {"Authorization": f"Bearer {API_KEY}"}
    text = "Hello, world! The café is open."
    ids = httpx.post(srv.url + "/tokenize", json={"content": text}, headers=h).json()["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)
    back = httpx.post(srv.url + "/detokenize", json={"tokens": ids}, headers=h).json()["content"]
    assert back == text
    pieces = httpx.post(srv.url + "/tokenize", json={"content": text, "with_pieces": True}, headers=h).json()["tokens"]
    assert [p["id"] for p in pieces] == ids


def test_image_cache_encodes_an_image_once(srv, client):
    img = drawing(70, 80, 5)
    before = get(srv, "/metrics").text
    first = chat(client, image_message("What colour is it?", img), max_tokens=6, temperature=0)
    second = chat(client, image_message("What colour is it?", img), max_tokens=6, temperature=0)
    after = get(srv, "/metrics").text
    assert first.choices[0].message.content == second.choices[0].message.content
    assert metric(after, "image_encodes_total") - metric(before, "image_encodes_total") == 1
    assert metric(after, "image_cache_hits_total") - metric(before, "image_cache_hits_total") == 1
    assert metric(after, "image_cache_misses_total") - metric(before, "image_cache_misses_total") == 1


def test_multi_turn_and_file_url(srv, client):
    url = f"file://{srv.media / 'a.png'}"
    messages = [{"role": "system", "content": "You are brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": "A picture."},
                {"role": "user", "content": "Say it again."}]
    r = chat(client, messages, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens > 100 and r.choices[0].finish_reason in ("stop", "length")


def test_request_log_lines(srv):
    lines = [x for x in srv.log if x.startswith("request ")]
    assert lines and all(" tokens in " in x and " out, " in x and " images, " in x and " ms" in x for x in lines)


def test_chat_page_is_served_without_a_key(srv):
    from llava_jax.serving.app import CHAT_PAGE

    r = get(srv, "/", key=None)
    if CHAT_PAGE.is_file():
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.text == CHAT_PAGE.read_text(encoding="utf-8")
    else:
        assert r.status_code == 404 and r.json()["error"]["message"]
