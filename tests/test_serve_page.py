"""The page of `attnlab serve` (GET /): self-contained, and working in a real headless Chromium: type a
sentence, translate, read the translation (the same as `attnlab translate`'s) and the attention maps
(a heatmap with a row per target token and a column per source token), and generate text.

The browser test skips, saying what is missing, where chromium, chromedriver or selenium are not
installed (CI installs them: .ci/run).
"""

from __future__ import annotations

import re

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

from serving import SENTENCES, make_runs, running  # noqa: E402
from test_report import browser  # noqa: E402, F401  (the headless-browser fixture, shared)

from attnlab.app.cli import main  # noqa: E402
from attnlab.app.serve import ServeConfig  # noqa: E402
from attnlab.decode.translate import load_translator  # noqa: E402

TRANSLATE, GENERATE = "/v1/translate", "/v1/generate"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here decodes on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("serve-page"))


@pytest.fixture(scope="module")
def server(runs):
    with running(runs, ServeConfig(port=0)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def translator(runs):
    return load_translator(runs["translation"])


def test_the_page_is_self_contained(client):
    reply = client.get("/")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    page = reply.text
    assert not re.search(r"""\s(src|href)\s*=""", page)  # no external script, style, font or image
    assert "http://" not in page and "https://" not in page and "@import" not in page and "url(" not in page
    assert "default-src 'none'" in reply.headers["content-security-policy"]


def test_the_page_in_headless_chromium(browser, server, translator, runs, tmp_path, capsys):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = server
    sentence = SENTENCES[0]
    assert main(["translate", "--checkpoint", str(runs["translation"]), "--threads", "1", sentence]) == 0
    from_cli = capsys.readouterr().out.removesuffix("\n")

    browser.get(url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "de-en"
    browser.find_element(By.ID, "source").send_keys(sentence)
    browser.find_element(By.ID, "translate-button").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "translation failed")))
    assert browser.find_element(By.ID, "status").text.startswith("done")
    assert browser.find_element(By.ID, "translation").get_attribute("textContent") == from_cli

    # The same request through the API says how many tokens each side has.
    data = httpx.post(url + TRANSLATE, json={"text": [sentence], "n_best": 4, "attention": True}, timeout=60).json()
    tokens = data["attention"][0]
    rows, cols = len(tokens["tgt_tokens"]), len(tokens["src_tokens"])
    assert cols == len(translator.src_vocab.encode(sentence)) + 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")) == rows
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap thead th.key")) == cols
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")) == rows * cols
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid .mini canvas")) == 2 * 4  # every layer and head
    shown = [float(td.get_attribute("data-weight")) for td in browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")]
    assert shown == pytest.approx([w for row in tokens["cross"][0][0] for w in row], abs=1e-9)
    alternatives = browser.find_elements(By.CSS_SELECTOR, "#alternatives .alt-text")
    assert [a.get_attribute("textContent") for a in alternatives] == [a["text"] for a in data["alternatives"][0]]

    browser.find_element(By.ID, "mini-1-2").click()  # layer 2, head 3, large
    assert "layer 2, head 3" in browser.find_element(By.ID, "caption").text
    cell = browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")[1]
    ActionChains(browser).move_to_element(cell).perform()
    hover = browser.find_element(By.ID, "hover").text
    assert hover.startswith(f"'<bos>' (producing '{tokens['output_tokens'][0]}') \u2192 '{tokens['src_tokens'][1]}': ")
    assert float(hover.rsplit(": ", 1)[1]) == pytest.approx(tokens["cross"][1][2][0][1], abs=1e-4)
    Select(browser.find_element(By.ID, "kind")).select_by_value("encoder")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")) == cols * cols
    Select(browser.find_element(By.ID, "kind")).select_by_value("decoder")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")) == rows * rows
    browser.save_screenshot(str(tmp_path / "serve_page.png"))
    assert (tmp_path / "serve_page.png").stat().st_size > 1000

    # The language model: a prompt, and the text the API gives for the same seed.
    Select(browser.find_element(By.ID, "model")).select_by_value("shakespeare")
    browser.find_element(By.ID, "prompt").send_keys("Ein")
    for field, value in (("max-new-tokens", "25"), ("seed", "3")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate-button").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "generation failed")))
    want = httpx.post(url + GENERATE, json={"prompt": "Ein", "max_new_tokens": 25, "temperature": 0.8, "seed": 3},
                      timeout=60).json()["text"]
    assert browser.find_element(By.ID, "generated").get_attribute("textContent") == want
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
