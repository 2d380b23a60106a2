"""Bad requests to `python -m llava_jax.serve`: each gets its status and OpenAI's error object (never a
traceback), and the server stays healthy afterwards. The server is tests/serve_helpers.py's."""

from __future__ import annotations

import base64
import threading

import httpx
import openai
import pytest
from serve_helpers import API_KEY, MAX_IMAGES, data_url, get, metric, server, start, wait_until
from tiny_mmproj import drawing

IMG = drawing(40, 30, 3)


@pytest.fixture(scope="module")
def srv():
    return server()


def post(srv, body=None, content=None, key=API_KEY, path="/v1/chat/completions"):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    return httpx.post(srv.url + path, json=body, content=content, headers=headers, timeout=120)


def check_error(r, status: int, words: str = ""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert "Traceback" not in r.text
    assert words.lower() in err["message"].lower(), err["message"]
    return err


def image_body(url: str, n: int = 1) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}] * n
    return {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "What is it?"}]}], "max_tokens": 2}


HI = [{"role": "user", "content": "Hi"}]


def test_bad_requests(srv):
    check_error(post(srv, {"messages": HI}, key=None), 401, "no api key")
    check_error(post(srv, {"messages": HI}, key="wrong"), 401, "invalid api key")
    check_error(get(srv, "/v1/models", key="wrong"), 401)
    check_error(post(srv, content=b'{"messages": [', key=API_KEY), 400, "not valid json")
    check_error(post(srv, {"max_tokens": 3}), 400, "messages")
    err = check_error(post(srv, {"messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}]}), 400, "video")
    assert err["param"] == "messages[0].content[0].type"
    check_error(post(srv, image_body("data:image/png;base64,@@not-base64@@")), 400, "base64")
    check_error(post(srv, image_body("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode())),
                400, "not an image")
    check_error(post(srv, image_body(data_url(IMG), MAX_IMAGES + 1)), 400, "too many images")
    err = check_error(post(srv, {"messages": [{"role": "user", "content": "word " * 1500}]}), 400, "context")
    assert err["code"] == "context_length_exceeded"
    check_error(post(srv, {"messages": HI, "max_tokens": -1}), 400, "max_tokens")
    check_error(post(srv, {"messages": HI, "temperature": "x"}), 400, "temperature")
    check_error(post(srv, image_body(f"file://{srv.outside}")), 400, "outside --media-path")
    check_error(post(srv, image_body(f"file://{srv.media}/../{srv.outside.name}")), 400, "..")
    check_error(post(srv, image_body(f"file://{srv.media / 'link.png'}")), 400, "outside --media-path")
    check_error(post(srv, image_body("http://127.0.0.1:1/cat.png")), 400, "--allow-remote-media")
    check_error(post(srv, {"prompt": "USER: <image>\nWhat is it? ASSISTANT:"}, path="/v1/completions"), 400, "<image>")
    check_error(post(srv, {"tokens": [10 ** 9]}, path="/detokenize"), 400, "vocabulary")
    check_error(get(srv, "/v1/nothing-here"), 404)
    assert get(srv, "/health", key=None).status_code == 200


def test_a_30_mb_body_is_413(srv):
    big = data_url(IMG) + "A" * (30 << 20)
    check_error(post(srv, image_body(big)), 413, "limit")
    client = srv.client()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="x", messages=image_body(big)["messages"], max_tokens=2)
    assert e.value.status_code == 413
    assert get(srv, "/health", key=None).status_code == 200


def test_the_openai_client_sees_the_errors(srv):
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="wrong").chat.completions.create(model="x", messages=HI, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        srv.client().chat.completions.create(model="x", messages=HI, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    # the server still answers
    r = srv.client().chat.completions.create(model="x", messages=HI, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_a_full_queue_is_429_with_retry_after():
    """-np 1 --queue-size 1: one request decoding, one waiting, the third is refused over HTTP (429, OpenAI's
    error object, Retry-After); the server answers again once the two are gone."""
    srv = start(slots=1, extra=("--queue-size", "1"))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 900,
            "temperature": 0, "stream": True, "ignore_eos": True}
    streams = []  # (client, stream context, line iterator): kept, since a collected iterator closes the stream

    def open_stream():  # a streamed answer's headers come once the request has a slot
        http = httpx.Client(timeout=120)
        ctx = http.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=headers)
        streams.append((http, ctx, ctx.__enter__().iter_lines()))

    try:
        open_stream()  # takes the slot
        assert next(line for line in streams[0][2] if line.startswith("data: ")).startswith("data: {")
        waiter = threading.Thread(target=open_stream, daemon=True)  # waits for the slot
        waiter.start()
        assert wait_until(lambda: metric(get(srv, "/metrics").text, "requests_waiting") == 1)
        r = post(srv, {"messages": HI, "max_tokens": 2})
        check_error(r, 429, "busy")
        assert int(r.headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):
            srv.client().chat.completions.create(model="x", messages=HI, max_tokens=2)
        streams[0][1].__exit__(None, None, None)  # the first client goes away: the waiting one gets the slot
        waiter.join(120)
        assert len(streams) == 2
        streams[1][1].__exit__(None, None, None)
        assert wait_until(lambda: metric(get(srv, "/metrics").text, "slots_busy") == 0)
        r = srv.client().chat.completions.create(model="x", messages=HI, max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        for http, _, _ in streams:
            http.close()
        srv.proc.kill()
