"""The chat page (`GET /`, llava_jax/assets/chat.html) in a real headless browser against the real server.

Debian's Chromium + ChromeDriver (`apt-get install chromium chromium-driver`, `.ci/run` installs them) driven by
selenium. The server is `python -m llava_jax.serve --default-mmproj` (embedded SmolLM2 + the random mmproj: the
answers are meaningless but deterministic) on a free 127.0.0.1 port with an API key. In the page: without the key a
question shows the server's 401 error message; with the key, a question with an attached image (the file input)
streams an answer in more than one update, with a token count and tokens/s, and the streamed text equals the server's
non-streamed greedy answer to the same request; a follow-up question (multi-turn) is answered too; Stop aborts a
long answer. Under `CI=true` a missing browser, driver or selenium fails instead of skipping.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prerequisites import importorskip, skip_or_fail

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "llava_jax" / "assets" / "shapes.png"
API_KEY = "page-test-key"
QUESTION = "What is in the image?"
MAX_TOKENS = 12

pytestmark = [pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def http(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {API_KEY}",
                                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return 0, str(e).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server in a subprocess; its base URL once /health answers 200; killed at the end."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "llava_jax.serve", "--default-mmproj", "--host", "127.0.0.1", "--port", str(port),
           "-c", "2048", "-np", "2", "--api-key", API_KEY]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if http(base + "/health", timeout=5)[0] == 200:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Chromium (a fresh profile, no network beyond 127.0.0.1) through ChromeDriver."""
    importorskip("selenium")
    monkeypatch.setenv("SE_AVOID_STATS", "true")  # selenium-manager's usage pings (the driver is given: no downloads)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = find_binary("chromium", "chromium-browser")
    driver_path = find_binary("chromedriver")
    if chromium is None or driver_path is None:
        skip_or_fail("Chromium and ChromeDriver are needed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver_path, log_output=str(tmp_path / "chromedriver.log")), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def wait_for(drv, predicate, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.1).until(lambda d: predicate(d))
    except Exception as e:  # TimeoutException: say what the page shows
        state = drv.execute_script(
            "return {stats: document.getElementById('stats').textContent, data: {...document.getElementById('stats').dataset},"
            " error: document.getElementById('error').textContent,"
            " messages: [...document.querySelectorAll('#messages .msg')].map(m => m.textContent)}")
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; page: {state}") from e


def stats(drv) -> dict:
    return drv.execute_script("return {...document.getElementById('stats').dataset}")


def assistant_texts(drv) -> list[str]:
    """The raw text of each assistant message (textContent: whitespace kept, unlike WebElement.text)."""
    return drv.execute_script("return [...document.querySelectorAll('#messages .msg.assistant .text')].map(e => e.textContent)")


def ask(drv, text: str, image: Path | None = None, timeout: float = 120) -> dict:
    """Type `text` (and attach `image`), send, wait until the answer finished; the #stats data then."""
    from selenium.webdriver.common.by import By

    before = len(drv.find_elements(By.CSS_SELECTOR, "#messages .msg"))
    if image is not None:
        drv.find_element(By.ID, "image-input").send_keys(str(image))
        wait_for(drv, lambda d: d.find_element(By.ID, "image-preview").get_attribute("src").startswith("data:image/"),
                 10, "the image preview")
    prompt = drv.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(text)
    drv.find_element(By.ID, "send").click()
    wait_for(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages .msg")) > before, 10, "the user message")
    wait_for(drv, lambda d: stats(d)["state"] in ("done", "error", "stopped"), timeout, "the answer to finish")
    return stats(drv)


def test_chat_page_streams_an_image_answer(browser, server):  # the browser first: a missing one fails fast
    from selenium.webdriver.common.by import By

    drv = browser
    t0 = time.monotonic()
    drv.get(server + "/")
    assert drv.title == "llava_jax chat"
    for element_id in ("prompt", "image-input", "send", "stop", "messages", "stats", "api-key", "error"):
        assert drv.find_element(By.ID, element_id)
    wait_for(drv, lambda d: d.find_element(By.ID, "status").text == "ready", 30, "the page to see /health 200")
    # the page loads nothing from anywhere else: every resource it fetched is on this server
    urls = drv.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(server) for u in urls), urls

    # 1. no API key: the server's 401 error object's message is shown, the turn is not kept
    s = ask(drv, "Hello?")
    assert s["state"] == "error", s
    error = drv.find_element(By.ID, "error").text
    assert error.startswith("Error 401") and len(error) > len("Error 401: "), error
    assert assistant_texts(drv) == []

    # 2. with the key: an image question streams in
    drv.find_element(By.ID, "settings").click()  # open the <details>
    drv.find_element(By.ID, "api-key").send_keys(API_KEY)
    max_tokens = drv.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys(str(MAX_TOKENS))
    temperature = drv.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    s = ask(drv, QUESTION, image=IMAGE)
    assert s["state"] == "done", (s, drv.find_element(By.ID, "error").text)
    assert drv.find_element(By.ID, "error").text == ""
    answers = assistant_texts(drv)
    assert len(answers) == 1 and answers[0] != "", answers
    assert int(s["chunks"]) > 1, s  # more than one streamed update reached the page
    assert int(s["tokens"]) >= int(s["chunks"]) and int(s["tokens"]) <= MAX_TOKENS, s  # usage.completion_tokens
    assert float(s["tps"]) > 0, s
    text = drv.find_element(By.ID, "stats").text
    assert "tokens/s" in text and f"{s['tokens']} tokens" in text, text
    img = drv.find_element(By.CSS_SELECTOR, "#messages .msg.user img")
    assert img.get_attribute("src").startswith("data:image/png;base64,")

    # the page's streamed text is the server's non-streamed greedy answer to the same request
    uri = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    status, body = http(server + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                  {"type": "text", "text": QUESTION}]}],
        "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200, body[:500]
    reply = json.loads(body)
    assert answers[0] == reply["choices"][0]["message"]["content"]
    assert int(s["tokens"]) == reply["usage"]["completion_tokens"]

    # 3. a follow-up (multi-turn: the page sends the whole conversation)
    s = ask(drv, "Say it again, shorter.")
    assert s["state"] == "done", (s, drv.find_element(By.ID, "error").text)
    answers = assistant_texts(drv)
    assert len(answers) == 2 and answers[1] != "" and int(s["tokens"]) > 0, (answers, s)
    assert len(drv.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 5  # the failed turn stays on screen, marked

    # 4. Stop aborts a long answer
    max_tokens.clear()
    max_tokens.send_keys("1000")
    drv.find_element(By.ID, "new-chat").click()
    prompt = drv.find_element(By.ID, "prompt")
    prompt.send_keys("Tell me a long story.")
    drv.find_element(By.ID, "send").click()
    wait_for(drv, lambda d: int(stats(d)["chunks"]) >= 2, 60, "the long answer to start")
    drv.find_element(By.ID, "stop").click()
    wait_for(drv, lambda d: stats(d)["state"] == "stopped", 10, "the stop")
    assert drv.find_element(By.ID, "send").is_enabled() and not drv.find_element(By.ID, "stop").is_enabled()
    assert drv.find_element(By.ID, "error").text == ""
    # the server stays healthy and serves the next request
    assert http(server + "/health")[0] == 200
    print(f"chat page checks: {time.monotonic() - t0:.1f} s", file=sys.stderr)


def test_chat_page_is_packaged():
    """pyproject ships assets/*.html with the package (the server reads the page from the installed package)."""
    text = (REPO / "pyproject.toml").read_text()
    assert '"assets/*.html"' in text
    page = (REPO / "llava_jax" / "assets" / "chat.html").read_text()
    assert "http://" not in page.replace("http://HOST", "") and "https://" not in page  # nothing from elsewhere
    assert os.path.getsize(REPO / "llava_jax" / "assets" / "chat.html") < 40_000
