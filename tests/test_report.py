"""The HTML attention report: self-contained, its data intact, and working in a real browser."""

from __future__ import annotations

import importlib.util
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from attnlab.inspect.report import (
    check_maps,
    format_top_attended,
    top_attended,
    write_report,
)

SRC = ["ein", "Mann", "fährt", "</script><b>", "Rad", "."]  # a hostile token must not break the page
TGT = ["<bos>", "a", "man", "rides"]
S, T, H, L = len(SRC), len(TGT), 4, 2


def random_maps(seed: int = 0) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def softmax(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).softmax(dim=-1)

    return {
        "encoder": [softmax(H, S, S) for _ in range(L)],
        "decoder": [softmax(H, T, T).tril() for _ in range(L)],
        "cross": [softmax(H, T, S) for _ in range(L)],
    }


class PageParser(HTMLParser):
    """Collects tags with their attributes, and the text of <script> elements by id."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: dict[str, str] = {}
        self._script_id: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "script":
            self._script_id = attributes.get("id") or f"script{len(self.scripts)}"
            self.scripts[self._script_id] = ""

    def handle_endtag(self, tag):
        if tag == "script":
            self._script_id = None

    def handle_data(self, data):
        if self._script_id is not None:
            self.scripts[self._script_id] += data


@pytest.fixture
def report(tmp_path) -> tuple[Path, dict[str, list[torch.Tensor]]]:
    maps = random_maps()
    path = write_report(
        maps, SRC, TGT, tmp_path / "report.html",
        title="Test report", source_text="ein Mann fährt Rad .", translation="a man rides",
        output_tokens=["a", "man", "rides", "<eos>"],
    )
    return path, maps


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


# -- the file itself --------------------------------------------------------------------------


def test_report_is_self_contained(report):
    path, _ = report
    page = path.read_text(encoding="utf-8")
    parser = parse(path)
    for tag, attributes in parser.tags:
        assert "src" not in attributes and "href" not in attributes, (tag, attributes)
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page
    assert not any(tag in ("link", "iframe", "img") for tag, _ in parser.tags)


def test_embedded_data_parses_with_the_right_shapes(report):
    path, maps = report
    data = json.loads(parse(path).scripts["attn-data"])
    assert data["src_tokens"] == SRC
    assert data["tgt_tokens"] == TGT
    assert data["output_tokens"] == ["a", "man", "rides", "<eos>"]
    assert [k["name"] for k in data["kinds"]] == ["encoder", "decoder", "cross"]
    expected = {"encoder": (L, H, S, S), "decoder": (L, H, T, T), "cross": (L, H, T, S)}
    for kind, shape in expected.items():
        embedded = torch.tensor(data["maps"][kind])
        assert tuple(embedded.shape) == shape
        torch.testing.assert_close(embedded, torch.stack(maps[kind]), atol=5e-5, rtol=0)


def test_hostile_tokens_are_escaped(report):
    path, _ = report
    page = path.read_text(encoding="utf-8")
    assert "</script><b>" not in page
    assert page.count("</script>") == 2  # the data block and the code block


def test_report_rejects_bad_maps(tmp_path):
    maps = random_maps()
    with pytest.raises(ValueError, match="valid kinds"):
        write_report({"self": maps["decoder"]}, SRC, TGT, tmp_path / "r.html")
    with pytest.raises(ValueError, match=r"cross layer 2: expected weights of shape \(heads, 4, 6\)"):
        write_report({"cross": [maps["cross"][0], maps["encoder"][0]]}, SRC, TGT, tmp_path / "r.html")
    with pytest.raises(ValueError, match="NaN"):
        write_report({"encoder": [torch.full((1, S, S), float("nan"))]}, SRC, TGT, tmp_path / "r.html")
    with pytest.raises(ValueError, match="no attention maps"):
        write_report({}, SRC, TGT, tmp_path / "r.html")
    with pytest.raises(ValueError, match="one output token per decoder position"):
        write_report(maps, SRC, TGT, tmp_path / "r.html", output_tokens=["a"])


def test_check_maps_accepts_stacked_and_batched_layers():
    maps = random_maps()
    stacked = torch.stack(maps["cross"])  # (L, H, T, S)
    batched = [w[None] for w in maps["cross"]]  # (1, H, T, S) per layer
    for given in (stacked, batched):
        checked = check_maps({"cross": given}, SRC, TGT)["cross"]
        assert [tuple(w.shape) for w in checked] == [(H, T, S)] * L


# -- top attended source tokens ---------------------------------------------------------------


def test_top_attended_averages_the_heads_of_the_last_layer():
    src = ["a", "b", "c"]
    tgt = ["x", "y"]
    first = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]] * 2)  # (H=2, T=2, S=3)
    last = torch.tensor(
        [
            [[0.5, 0.3, 0.2], [0.0, 0.1, 0.9]],  # head 1
            [[0.1, 0.7, 0.2], [0.0, 0.3, 0.7]],  # head 2
        ]
    )
    top = top_attended([first, last], src, tgt, k=2)
    assert [t for t, _ in top] == ["x", "y"]
    assert [s for s, _ in top[0][1]] == ["b", "a"]  # means 0.3, 0.5, 0.2 -> b 0.5, a 0.3
    assert [w for _, w in top[0][1]] == pytest.approx([0.5, 0.3])
    assert top[1][1] == [("c", pytest.approx(0.8)), ("b", pytest.approx(0.2))]

    everywhere = top_attended([first, last], src, tgt, k=1, layer=None)  # all layers and heads
    assert everywhere[0][1] == [("a", pytest.approx((1.0 + 0.3) / 2))]
    assert top_attended(torch.stack([first, last]), src, tgt, k=5, layer=0)[1][1][0] == ("a", 1.0)
    assert len(top_attended([first, last], src, tgt, k=5)[0][1]) == 3  # k capped at S


def test_top_attended_rejects_bad_arguments():
    w = [torch.full((1, 2, 3), 1 / 3)]
    with pytest.raises(ValueError, match="k must be positive"):
        top_attended(w, ["a", "b", "c"], ["x", "y"], k=0)
    with pytest.raises(ValueError, match="there are 1 layers"):
        top_attended(w, ["a", "b", "c"], ["x", "y"], layer=1)


def test_format_top_attended():
    text = format_top_attended([("man", [("Mann", 0.625), (".", 0.2)]), ("a", [("ein", 0.9)])])
    assert text == "'man'  ->  'Mann' (0.62), '.' (0.20)\n'a'    ->  'ein' (0.90)"
    assert format_top_attended([]) == ""


# -- in a real (headless) browser -------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _browser_or_skip() -> None:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if not CHROMEDRIVER.exists():
        missing.append(f"{CHROMEDRIVER} (apt-get install chromium-driver)")
    if importlib.util.find_spec("selenium") is None:
        missing.append("the Python package selenium (pip install selenium)")
    if missing:
        pytest.skip(
            "the headless-browser test of the HTML report needs " + "; ".join(missing)
            + ". Install them with `apt-get install chromium chromium-driver` and `pip install selenium`."
        )


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        "--disable-sync", "--disable-extensions", "--disable-default-apps",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _cell_weights(driver) -> list[float]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#heatmap td.cell'))"
        ".map(function (td) { return Number(td.getAttribute('data-weight')); });"
    )


def _choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def _expected(weights: torch.Tensor) -> list[float]:
    return weights.round(decimals=4).flatten().tolist()


def test_report_in_headless_chromium(browser, report):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path, maps = report
    browser.get(path.resolve().as_uri())
    assert _severe(browser) == []
    assert browser.title == "Test report"
    assert browser.find_element(By.ID, "translation").text == "a man rides"
    chips = browser.find_elements(By.CSS_SELECTOR, "#src-tokens .tok")
    assert [c.text for c in chips] == SRC

    # Initially: encoder self-attention, layer 1, head 1, a source x source map.
    assert len(browser.find_elements(By.CSS_SELECTOR, ".cell")) == S * S
    assert _cell_weights(browser) == pytest.approx(_expected(maps["encoder"][0][0]), abs=1e-6)
    keys = browser.find_elements(By.CSS_SELECTOR, "#heatmap th.key")
    assert [k.get_attribute("textContent") for k in keys] == SRC

    _choose(browser, "kind", "decoder")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".cell")) == T * T
    _choose(browser, "kind", "cross")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".cell")) == T * S
    assert _cell_weights(browser) == pytest.approx(_expected(maps["cross"][0][0]), abs=1e-6)
    rows = browser.find_elements(By.CSS_SELECTOR, "#heatmap th.query")
    assert rows[1].get_attribute("textContent") == "a \u2192 man"

    _choose(browser, "layer", "1")
    assert _cell_weights(browser) == pytest.approx(_expected(maps["cross"][1][0]), abs=1e-6)
    _choose(browser, "head", "2")
    assert _cell_weights(browser) == pytest.approx(_expected(maps["cross"][1][2]), abs=1e-6)
    assert "layer 2, head 3" in browser.find_element(By.ID, "caption").text
    _choose(browser, "head", "mean")
    mean = torch.tensor(_cell_weights(browser)).view(T, S)
    torch.testing.assert_close(mean, maps["cross"][1].round(decimals=4).mean(0), atol=1e-6, rtol=0)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".cell")) == T * S

    _choose(browser, "kind", "encoder")  # layer and head choice carry over
    assert len(browser.find_elements(By.CSS_SELECTOR, ".cell")) == S * S
    assert browser.find_element(By.ID, "layer").get_attribute("value") == "1"

    cell = browser.find_elements(By.CSS_SELECTOR, ".cell")[S + 2]  # query 'Mann', key 'fährt'
    ActionChains(browser).move_to_element(cell).perform()
    hover = browser.find_element(By.ID, "hover").text
    assert hover.startswith("'Mann' \u2192 'fährt': ")
    assert cell.get_attribute("title") == hover
    assert _severe(browser) == []


def test_browser_skip_message_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="pip install selenium"):
        _browser_or_skip()
