"""The web page at `/`, used as a person uses it: a real headless Chromium (Selenium driving Debian's chromium and
chromedriver) against real runners of each mode on loopback.

Each test types and clicks, then checks what the page shows against what the runner's own API answers for the
same request: the chat's streamed reply (greedy) and its token counts, the generated image's pixels, the heat
map's cosines. Stop buttons are pressed mid-generation and the runner's log must say it cancelled the job.
With MLXR_UPDATE_SCREENSHOTS=1 the tests rewrite docs/images/ui-{chat,image,embeddings}.png.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import chat_model_folder, cosine
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from mlxrunner.launcher import Runner

ROOT = Path(__file__).parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SCREENSHOTS = ROOT / "docs" / "images"
UPDATE_SCREENSHOTS = os.environ.get("MLXR_UPDATE_SCREENSHOTS") == "1"

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (BROWSER and DRIVER),
    reason="no headless browser: these tests need Debian's chromium and chromium-driver on PATH "
           "(apt-get install chromium chromium-driver)")

WAIT_S = 60  # the slowest wait: an image on a busy 2-core machine


# --- runners and the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_runner(tmp_path_factory):
    """The tiny Qwen3 with Qwen3's chat template (as tests/api/test_openai_chat.py serves it)."""
    folder = chat_model_folder(tmp_path_factory.mktemp("qwen3-chat"))
    with Runner.start(str(folder), timeout=120) as runner:
        yield runner


@pytest.fixture(scope="module")
def image_runner():
    with Runner.start(str(FIXTURES / "flux2-klein-tiny"), timeout=120) as runner:
        yield runner


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,850", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # A driver path given: Selenium Manager is not asked to find (or download) anything.
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def open_page(browser: WebDriver, runner: Runner, panel: str) -> None:
    browser.get(f"http://{runner.host}:{runner.port}/")
    wait(browser, lambda: browser.find_element(By.ID, panel).is_displayed())
    browser.get_log("browser")  # start each test with an empty console


def wait(browser: WebDriver, condition, timeout: float = WAIT_S):
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.02).until(lambda _: condition())
    except TimeoutException:
        shown = {element_id: by_id(browser, element_id).text for element_id in ("error", "chat-stats", "image-step")}
        raise AssertionError(f"timed out after {timeout} s; the page shows {shown}; its console: "
                             f"{browser.get_log('browser')}") from None


def by_id(browser: WebDriver, element_id: str) -> WebElement:
    return browser.find_element(By.ID, element_id)


def fill(browser: WebDriver, element_id: str, text: str) -> None:
    field = by_id(browser, element_id)
    field.clear()
    field.send_keys(text)


def script_errors(browser: WebDriver) -> list[str]:
    """Console errors other than the failed requests a test provoked on purpose (the page shows those)."""
    return [entry["message"] for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]


def screenshot(browser: WebDriver, name: str) -> None:
    if UPDATE_SCREENSHOTS:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / f"ui-{name}.png"))


def logged_cancel(runner: Runner, job: str) -> bool:
    return any(f"({job}) cancelled: client disconnected" in line for line in list(runner.stderr_tail))


def wait_for_log(runner: Runner, job: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not logged_cancel(runner, job) and time.monotonic() < deadline:
        time.sleep(0.05)
    return logged_cancel(runner, job)


def api(runner: Runner, path: str, body: dict) -> tuple[int, dict | bytes]:
    """POST straight to the runner, as a program would: (status, the JSON body or the raw body)."""
    request = urllib.request.Request(f"http://{runner.host}:{runner.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        raw, status = error.read(), error.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


# --- chat -------------------------------------------------------------------------------------------------

GREEDY = {"temperature": 0, "max_tokens": 24}


def chat_settings(browser: WebDriver, temperature: str, max_tokens: str) -> None:
    details = browser.find_element(By.CSS_SELECTOR, "#chat-form details")
    if not details.get_attribute("open"):
        details.find_element(By.TAG_NAME, "summary").click()
    fill(browser, "chat-temperature", temperature)
    fill(browser, "chat-max-tokens", max_tokens)


def send_message(browser: WebDriver, text: str) -> None:
    by_id(browser, "chat-input").send_keys(text, Keys.ENTER)


def finished_stats(browser: WebDriver) -> re.Match | None:
    return re.fullmatch(r"(\d+) tokens, [\d.]+ tokens/s, prompt (\d+) tokens, first token after \d+ ms",
                        by_id(browser, "chat-stats").text)


def rendered(browser: WebDriver, text: str) -> str:
    """`text` as the page's own Markdown renders it."""
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/ui/markdown.js').then((m) => done(m.renderMarkdown(arguments[0])));", text)


def test_the_header_shows_model_mode_backend_and_memory(browser, chat_runner):
    open_page(browser, chat_runner, "chat")
    health = chat_runner.health()
    assert health["architecture"] == "Qwen3ForCausalLM"
    model = by_id(browser, "status-model")
    assert model.text == Path(chat_runner.model).name and model.get_attribute("title") == chat_runner.model
    assert by_id(browser, "status-mode").text == "llm"
    assert by_id(browser, "status-backend").text == f"{health['backend']['name']} ({health['backend']['device']})"
    size = r"[\d.]+ (B|KiB|MiB|GiB|TiB)"
    assert re.fullmatch(f"{size}( of {size})? in use, peak {size}", by_id(browser, "status-memory").text)
    assert by_id(browser, "image").is_displayed() is False and by_id(browser, "embeddings").is_displayed() is False


def test_a_conversation_streams_each_reply_and_keeps_the_history(browser, chat_runner):
    open_page(browser, chat_runner, "chat")
    chat_settings(browser, "0", str(GREEDY["max_tokens"]))

    send_message(browser, "Hello there")
    wait(browser, lambda: finished_stats(browser))
    first = [{"role": "user", "content": "Hello there"}]
    status, answer = api(chat_runner, "/v1/chat/completions", {"messages": first, **GREEDY})
    assert status == 200
    reply = answer["choices"][0]["message"]["content"]
    # The page shows the API's greedy reply, rendered, and the API's counts.
    assert by_id(browser, "chat-log").find_element(By.CSS_SELECTOR, "li.assistant .body") \
        .get_attribute("innerHTML") == rendered(browser, reply)
    tokens, prompt_tokens = map(int, finished_stats(browser).groups())
    assert (tokens, prompt_tokens) == (answer["usage"]["completion_tokens"], answer["usage"]["prompt_tokens"])
    screenshot(browser, "chat")

    # The second turn is sent with the first one: its prompt is the whole conversation.
    send_message(browser, "And then?")
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "li.assistant")) == 2 and finished_stats(browser))
    both = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    status, answer = api(chat_runner, "/v1/chat/completions", {"messages": both, **GREEDY})
    assert status == 200
    assert int(finished_stats(browser).group(2)) == answer["usage"]["prompt_tokens"]
    assert browser.find_elements(By.CSS_SELECTOR, "li.assistant .body")[1].get_attribute("innerHTML") == \
        rendered(browser, answer["choices"][0]["message"]["content"])
    assert script_errors(browser) == []


def reply_length(browser: WebDriver) -> int:
    return browser.execute_script("return document.querySelector('li.assistant:last-child .body').textContent.length")


def log_overflows(browser: WebDriver) -> bool:
    return browser.execute_script("const log = document.getElementById('chat-log');"
                                  "return log.scrollHeight > log.clientHeight + 100")


def test_the_reply_streams_and_stop_cancels_it_on_the_runner(browser, chat_runner):
    open_page(browser, chat_runner, "chat")
    chat_settings(browser, "0", "4000")  # 4000 tokens: seconds of streaming
    send_message(browser, "Hello there")
    wait(browser, lambda: reply_length(browser) > 0)
    first_seen = reply_length(browser)
    stop_at = by_id(browser, "chat-stop").rect
    wait(browser, lambda: log_overflows(browser))  # the text grows as tokens arrive, past the log's height
    # The log scrolls in its own box and follows the reply; the Stop button stays under the pointer.
    assert reply_length(browser) > first_seen
    assert by_id(browser, "chat-stop").rect == stop_at
    assert browser.execute_script("const log = document.getElementById('chat-log');"
                                  "return log.scrollHeight - log.scrollTop - log.clientHeight") < 24
    by_id(browser, "chat-stop").click()
    wait(browser, lambda: by_id(browser, "chat-stats").text == "stopped")
    assert wait_for_log(chat_runner, "chat"), list(chat_runner.stderr_tail)[-5:]
    assert "stopped" in browser.find_element(By.CSS_SELECTOR, "li.assistant").get_attribute("class")
    assert by_id(browser, "chat-send").is_enabled() and not by_id(browser, "chat-stop").is_enabled()
    assert script_errors(browser) == []


@pytest.mark.parametrize("text, html", [
    ("<img src=x onerror=alert(1)> & <script>", "<p>&lt;img src=x onerror=alert(1)&gt; &amp; &lt;script&gt;</p>"),
    ("**bold** and *it* and `<b>`", "<p><strong>bold</strong> and <em>it</em> and <code>&lt;b&gt;</code></p>"),
    ("# Title\n\n- a\n- b\n\n1. one", "<h3>Title</h3><ul><li>a</li><li>b</li></ul><ol><li>one</li></ol>"),
    ("```python\nx = '<a>'\n```\nafter", "<pre><code>x = '&lt;a&gt;'</code></pre><p>after</p>"),
    ("```\nstill streaming", "<pre><code>still streaming</code></pre>"),
    ('[link](javascript:alert(1)) "q"', "<p>[link](javascript:alert(1)) &quot;q&quot;</p>"),
])
def test_replies_markdown_makes_no_markup_of_the_models_own(browser, chat_runner, text, html):
    if not browser.current_url.startswith(f"http://{chat_runner.host}:{chat_runner.port}/"):
        open_page(browser, chat_runner, "chat")
    assert rendered(browser, text) == html


def test_a_prompt_too_long_shows_the_runners_message(browser, chat_runner):
    open_page(browser, chat_runner, "chat")
    long_message = "word " * 2000  # more tokens than the model's context of 4096
    field = by_id(browser, "chat-input")
    browser.execute_script("arguments[0].value = arguments[1]", field, long_message)  # pasted: typing is slow
    field.send_keys(Keys.ENTER)
    wait(browser, lambda: by_id(browser, "error").is_displayed())
    status, answer = api(chat_runner, "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": long_message.strip()}]})
    assert status == 400
    assert by_id(browser, "error").text == answer["error"]["message"]
    # The failed turn is not part of the conversation: the next message is sent alone.
    chat_settings(browser, "0", "4")
    send_message(browser, "Hello there")
    wait(browser, lambda: finished_stats(browser))
    _, answer = api(chat_runner, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 4})
    assert int(finished_stats(browser).group(2)) == answer["usage"]["prompt_tokens"]
    assert not by_id(browser, "error").is_displayed()


# --- images -----------------------------------------------------------------------------------------------


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def shown_pixels(browser: WebDriver, element_id: str) -> np.ndarray:
    """The RGB pixels an <img> shows, read back from the page through a canvas."""
    width, height, encoded = browser.execute_script("""
        const image = document.getElementById(arguments[0]);
        const canvas = document.createElement("canvas");
        canvas.width = image.naturalWidth;
        canvas.height = image.naturalHeight;
        const context = canvas.getContext("2d");
        context.drawImage(image, 0, 0);
        const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
        let text = "";
        for (const byte of rgba) text += String.fromCharCode(byte);
        return [canvas.width, canvas.height, btoa(text)];
    """, element_id)
    rgba = np.frombuffer(base64.b64decode(encoded), np.uint8).reshape(height, width, 4)
    return rgba[..., :3]


def record_progress(browser: WebDriver) -> None:
    browser.execute_script("""
        window.progressSeen = [];
        const bar = document.getElementById("image-progress");
        new MutationObserver(() => window.progressSeen.push([bar.value, bar.max]))
          .observe(bar, {attributes: true, attributeFilter: ["value", "max"]});
    """)


def image_form(browser: WebDriver, prompt: str, width: str, height: str, steps: str, seed: str) -> None:
    fill(browser, "image-prompt", prompt)
    for element_id, value in (("image-width", width), ("image-height", height), ("image-steps", steps),
                              ("image-seed", seed)):
        field = by_id(browser, element_id)
        field.clear()
        if value:
            field.send_keys(value)


def generated(browser: WebDriver, count: int) -> bool:
    return len(browser.find_elements(By.CSS_SELECTOR, "#gallery li")) == count


def test_an_image_shows_progress_then_the_runners_pixels_and_joins_the_gallery(browser, image_runner):
    open_page(browser, image_runner, "image")
    image_form(browser, "a red fox in the snow", "64", "64", "8", "7")
    record_progress(browser)
    by_id(browser, "image-generate").click()
    wait(browser, lambda: generated(browser, 1))

    assert by_id(browser, "image-result").get_attribute("src").startswith("blob:")
    seen = [value for value, maximum in browser.execute_script("return window.progressSeen") if maximum == 8]
    assert len(set(seen)) >= 3 and seen == sorted(seen) and seen[-1] == 8, seen  # the bar moved, step by step
    caption = by_id(browser, "image-caption").text
    assert caption.startswith("64×64, 8 steps, seed 7; encode ") and "ignored" not in caption
    status, expected = api(image_runner, "/completion", {"prompt": "a red fox in the snow", "width": 64,
                                                         "height": 64, "steps": 8, "seed": 7})
    assert status == 200
    final = json.loads(expected.splitlines()[-1])
    np.testing.assert_array_equal(shown_pixels(browser, "image-result"), pixels(base64.b64decode(final["image"])))
    link = browser.find_element(By.CSS_SELECTOR, "#gallery li a")
    assert link.get_attribute("download") == "mlxrunner-7.png" and link.get_attribute("href").startswith("blob:")
    screenshot(browser, "image")
    assert script_errors(browser) == []


def drop_files(browser: WebDriver, element_id: str, name: str, png: bytes) -> None:
    """Drag a file onto an element: the drop event a person's drag from their file manager fires."""
    browser.execute_script("""
        const [id, name, encoded] = arguments;
        const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], name, {type: "image/png"}));
        const zone = document.getElementById(id);
        for (const type of ["dragenter", "dragover", "drop"]) {
          zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: files}));
        }
    """, element_id, name, base64.b64encode(png).decode())


def test_a_dropped_reference_image_is_edited_from(browser, image_runner):
    open_page(browser, image_runner, "image")
    reference = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 80, 3), dtype=np.uint8)).save(reference, "PNG")
    drop_files(browser, "drop-zone", "fox.png", reference.getvalue())
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#reference-list img"))
    image_form(browser, "make the fox red", "", "", "2", "5")  # no size: the reference's
    by_id(browser, "image-generate").click()
    wait(browser, lambda: generated(browser, 1))

    assert by_id(browser, "image-caption").text.startswith("80×112, 2 steps, seed 5; ")
    data_url = "data:image/png;base64," + base64.b64encode(reference.getvalue()).decode()
    status, expected = api(image_runner, "/completion", {"prompt": "make the fox red", "steps": 2, "seed": 5,
                                                         "images": [data_url]})
    assert status == 200
    final = json.loads(expected.splitlines()[-1])
    np.testing.assert_array_equal(shown_pixels(browser, "image-result"), pixels(base64.b64decode(final["image"])))
    browser.find_element(By.CSS_SELECTOR, "#reference-list button").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#reference-list li") == []
    assert script_errors(browser) == []


def test_stop_cancels_the_image_on_the_runner(browser, image_runner):
    open_page(browser, image_runner, "image")
    image_form(browser, "a fox", "256", "256", "200", "1")  # about a minute of denoising here
    by_id(browser, "image-generate").click()
    progress = by_id(browser, "image-progress")
    wait(browser, lambda: progress.get_attribute("max") == "200" and int(progress.get_attribute("value")) >= 2)
    by_id(browser, "image-stop").click()
    wait(browser, lambda: by_id(browser, "image-step").text == "stopped")
    assert wait_for_log(image_runner, "completion"), list(image_runner.stderr_tail)[-5:]
    assert int(progress.get_attribute("value")) < 200 and generated(browser, 0)
    assert by_id(browser, "image-generate").is_enabled() and not by_id(browser, "image-stop").is_enabled()
    assert script_errors(browser) == []


def test_a_size_too_large_shows_the_runners_message(browser, image_runner):
    open_page(browser, image_runner, "image")
    image_form(browser, "a fox", "4096", "4096", "1", "1")
    by_id(browser, "image-generate").click()
    wait(browser, lambda: by_id(browser, "error").is_displayed())
    status, answer = api(image_runner, "/completion", {"prompt": "a fox", "width": 4096, "height": 4096, "steps": 1,
                                                       "seed": 1})
    assert status == 400 and by_id(browser, "error").text == answer["error"]
    assert generated(browser, 0)


# --- embeddings -------------------------------------------------------------------------------------------


def test_sentences_become_a_heat_map_of_the_runners_cosines(browser, minilm_runner):
    open_page(browser, minilm_runner, "embeddings")
    sentences = by_id(browser, "embeddings-input").get_attribute("value").splitlines()
    by_id(browser, "embeddings-compare").click()
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell"))

    cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap tr")
    vectors = minilm_runner.embed(sentences)
    rows = [row.find_elements(By.CSS_SELECTOR, "td.cell") for row in cells[1:]]
    assert len(rows) == len(sentences) == 4 and all(len(row) == 4 for row in rows)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            assert float(cell.get_attribute("data-similarity")) == pytest.approx(cosine(vectors[i], vectors[j]),
                                                                                 abs=1e-5)
            assert cell.text == f"{cosine(vectors[i], vectors[j]):.2f}"
    assert by_id(browser, "embeddings-stats").text.startswith("4 vectors of 384 dimensions, ")
    screenshot(browser, "embeddings")
    assert script_errors(browser) == []


def test_no_sentences_shows_the_runners_message(browser, minilm_runner):
    open_page(browser, minilm_runner, "embeddings")
    fill(browser, "embeddings-input", "   ")
    by_id(browser, "embeddings-compare").click()
    wait(browser, lambda: by_id(browser, "error").is_displayed())
    status, answer = api(minilm_runner, "/v1/embeddings", {"input": []})
    assert status == 400 and by_id(browser, "error").text == answer["error"]["message"]
