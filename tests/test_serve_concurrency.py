"""Continuous batching through the HTTP server: 16 concurrent clients with mixed requests each get their
solo greedy answer, more than one slot is busy at once, and a client that disconnects mid-stream frees
its slot. The server is tests/serve_helpers.py's (-np 4)."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import API_KEY, SLOTS, get, image_message, metric, server, wait_until
from tiny_mmproj import drawing

pytestmark = pytest.mark.slow

IMAGES = [drawing(90, 60, 1), drawing(40, 100, 2), drawing(64, 64, 4)]
QUESTIONS = ["What is the capital of France?", "Name a fruit.", "Why is the sky blue?", "Say hello.",
             "Describe the image.", "What colour is it?", "Compare them.", "Count to five."]


def request(i: int) -> dict:
    """Request i of the 16: text only, one image or two, streamed or not, max_tokens 3..10."""
    kind = i % 3
    q = QUESTIONS[i % len(QUESTIONS)]
    if kind == 0:
        messages = [{"role": "user", "content": q}]
    elif kind == 1:
        messages = image_message(q, IMAGES[i % 3])
    else:
        messages = image_message(q, IMAGES[i % 3], IMAGES[(i + 1) % 3])
    return {"messages": messages, "max_tokens": 3 + i % 8, "temperature": 0, "stream": i % 2 == 1}


def answer(client, body: dict) -> str:
    r = client.chat.completions.create(model="llava", **body)
    if body["stream"]:
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    return r.choices[0].message.content


def test_16_concurrent_clients_get_their_solo_answers():
    srv = server()
    client = srv.client()
    bodies = [request(i) for i in range(16)]
    solo = [answer(client, b) for b in bodies]  # one at a time
    busy, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            busy.append(metric(get(srv, "/metrics").text, "slots_busy"))
            stop.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda b: answer(client, b), bodies))
    finally:
        stop.set()
        watcher.join()
    assert together == solo
    assert max(busy) > 1  # rows decoded together
    assert metric(get(srv, "/metrics").text, "slots_busy_max") == SLOTS


def cancelled(srv) -> int:
    m = re.search(r'requests_total\{endpoint="chat",outcome="cancelled"\} (\d+)', get(srv, "/metrics").text)
    return int(m.group(1)) if m else 0


def test_disconnect_mid_stream_frees_the_slot():
    srv = server()
    before = cancelled(srv)
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 900,
            "temperature": 0, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    streams = []
    for _ in range(SLOTS):  # every slot busy with a long answer
        http = httpx.Client(timeout=120)
        ctx = http.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=headers)
        resp = ctx.__enter__()
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
        streams.append((http, ctx))
    result = {}
    late = threading.Thread(target=lambda: result.update(r=srv.client().chat.completions.create(
        model="llava", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)))
    late.start()
    for http, ctx in streams:  # the clients go away mid-answer
        ctx.__exit__(None, None, None)
        http.close()
    late.join(120)
    assert "r" in result and result["r"].usage.completion_tokens >= 1  # served: the slots were freed
    assert wait_until(lambda: cancelled(srv) - before == SLOTS)
    assert wait_until(lambda: metric(get(srv, "/metrics").text, "slots_busy") == 0)
