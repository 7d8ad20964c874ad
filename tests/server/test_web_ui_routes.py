"""The web page's routes on real runner processes: served at / by default, with every file it loads; not
served under --no-ui, nor under --mlx-engine (Ollama's parent is a program). What the page does in a
browser is tests/browser/."""

from __future__ import annotations

import http.client
import re
from pathlib import Path

from mlxrunner.launcher import Runner
from mlxrunner.settings import resolve

QWEN3 = Path(__file__).parents[1] / "fixtures" / "llm" / "qwen3-tiny"
UI_FOLDER = Path(__file__).parents[2] / "src" / "mlxrunner" / "http" / "ui"


def get(runner: Runner, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(runner.host, runner.port, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def files_the_page_loads() -> set[str]:
    """Every /ui/ path that index.html names and every module the scripts import."""
    named = set(re.findall(r'"(/ui/[\w.]+)"', (UI_FOLDER / "index.html").read_text()))
    for script in UI_FOLDER.glob("*.js"):
        named |= {f"/ui/{name}" for name in re.findall(r'from "\./([\w.]+)"', script.read_text())}
    return named


def test_the_page_and_every_file_it_loads_are_served(minilm_runner):
    status, headers, body = get(minilm_runner, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert body == (UI_FOLDER / "index.html").read_bytes()
    assert "default-src 'self'" in headers["content-security-policy"]  # nothing from elsewhere, ever
    loaded = files_the_page_loads()
    assert {"/ui/app.js", "/ui/style.css", "/ui/chat.js", "/ui/image.js", "/ui/embeddings.js"} <= loaded
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    for path in sorted(loaded):
        status, headers, body = get(minilm_runner, path)
        assert status == 200, path
        assert headers["content-type"] == types[Path(path).suffix], path
        assert body == (UI_FOLDER / Path(path).name).read_bytes()


def test_a_missing_file_is_404_and_a_post_to_the_page_405(minilm_runner):
    assert get(minilm_runner, "/ui/missing.js")[0] == 404
    for outside in ("/ui/../ui.py", "/ui/..%2Fui.py", "/ui/..%2F..%2F..%2Fdocs%2Fui.html"):
        assert get(minilm_runner, outside)[0] == 404, outside  # nothing outside the page's folder
    status, headers, _ = get(minilm_runner, "/", method="POST")
    assert status == 405 and "GET" in headers["allow"]


def test_no_ui_serves_no_page():
    assert resolve({"model": "m"}).serve_ui is True
    assert resolve({"model": "m", "no_ui": True}).serve_ui is False
    with Runner.start("all-minilm", timeout=120, extra_args=["--no-ui"]) as runner:
        assert get(runner, "/")[0] == 404 and get(runner, "/ui/app.js")[0] == 404
        assert runner.health()["status"] == "ok"


def test_ollamas_mlx_engine_wire_serves_no_page():
    with Runner.start(str(QWEN3), timeout=120, extra_args=["--mlx-engine"]) as runner:
        assert get(runner, "/")[0] == 404 and get(runner, "/ui/app.js")[0] == 404
