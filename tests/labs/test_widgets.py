"""The interactive figures in headless Chromium: they run without errors or network, and the
slider really moves what is drawn. The data checks run without a browser."""
from __future__ import annotations

import json
import os
import re

import pytest

from lmstack.labs import widgets

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def _points_page() -> str:
    still = [[0.1, 0.2, 0.3], [0.4, -0.2, 0.0]]
    moved = [[0.5, 0.5, 0.5], [-0.4, 0.2, 0.1]]
    return widgets.points_3d("t", {"a": {"frames": [still, moved], "labels": ["x</script>", "y"], "note": "n"},
                                   "b": {"frames": [still, still], "labels": ["x", "y"]}})


def _data(html: str) -> dict:
    return json.loads(re.search(r"const DATA=(.*?);\n", html).group(1).replace("<\\/", "</"))


def test_payload_is_the_data_and_cannot_close_the_script():
    html = _points_page()
    assert html.count("</script>") == 1                                    # the label's "</script>" is escaped
    d = _data(html)
    assert d["sets"]["a"]["frames"][1][0] == [0.5, 0.5, 0.5] and d["sets"]["a"]["labels"][0] == "x</script>"
    with pytest.raises(ValueError, match="one point per label"):
        widgets.points_3d("t", {"a": {"frames": [[[0, 0, 0]], [[0, 0, 0]]], "labels": ["x", "y"]}})
    with pytest.raises(ValueError, match="2 values for 3 labels"):
        widgets.slider_bars("t", "s", ["k"], {"k": {"values": [1, 2]}}, ["a", "b", "c"])


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs /usr/bin/chromium")
def test_widgets_run_and_respond_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright
    pages = {"points": _points_page(),
             "bars": widgets.slider_bars("t", "temperature", ["0.5", "2"],
                                         {"0.5": {"values": [0.9, 0.1], "kept": [True, False], "note": "cold"},
                                          "2": {"values": [0.6, 0.4], "note": "warm"}}, ["a", "b"])}
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            for name, html in pages.items():
                (tmp_path / f"{name}.html").write_text(html)
            page.goto(f"file://{tmp_path}/points.html")
            set_value = "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }"
            page.eval_on_selector("#t", set_value, "0")
            page.wait_for_timeout(50)
            assert page.text_content("#note") == "n"
            # the view turns by itself, so compare two sets at the same instant instead of two frames
            page.click("text=b")
            page.eval_on_selector("#t", set_value, "1000")
            still = page.evaluate("() => [0, 1].map(i => at(DATA.sets.b, i))")
            page.click("text=a")
            moved = page.evaluate("() => [0, 1].map(i => at(DATA.sets.a, i))")
            assert still[0] == pytest.approx([0.1, 0.2, 0.3]) and still[1] == pytest.approx([0.4, -0.2, 0.0])
            assert moved[0] == pytest.approx([0.5, 0.5, 0.5]) and moved[1] == pytest.approx([-0.4, 0.2, 0.1])
            page.eval_on_selector("#t", set_value, "500")
            half = page.evaluate("() => at(DATA.sets.a, 0)")
            assert half == pytest.approx([0.3, 0.35, 0.4])
            page.goto(f"file://{tmp_path}/bars.html")
            assert page.text_content("#v") == "0.5" and page.text_content("#note") == "cold"
            page.eval_on_selector("#s", set_value, "1")
            assert page.text_content("#v") == "2" and page.text_content("#note") == "warm"
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith("file://") for u in requests)                  # nothing from a network
