"""The dashboard in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
chat streams text (and says so when the model is not chat-tuned), the temperature slider
reshapes the next-token distribution (0 collapses it to one token), the token view shows
spans (a character cut across tokens as one), the attention view takes a several-line prompt
and draws heatmaps. Screenshots land in the test's tmp dir."""
from __future__ import annotations

import json
import os

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs /usr/bin/chromium (apt-get install chromium)")]


def _bar_probs(page) -> list[float]:
    return [float(x) for x in page.eval_on_selector_all(".bar-row", "rows => rows.map(r => r.dataset.prob)")]


def _set_slider(page, selector: str, value: str) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def _sampler_shows(page, key: str, value: str) -> None:
    """Wait until the bars are those of the server's answer for this setting (a round trip)."""
    page.wait_for_function(f"document.querySelector('#sampler-bars').dataset.{key} === '{value}'", timeout=10_000)


def test_dashboard_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    marker = server.run_dir / "train_config.json"      # what a pretrained-only run dir holds
    marker.write_text("{}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelector('#model-info').textContent.includes('context')")
            page.wait_for_selector("#chat-notice:not([hidden])")
            assert "not chat-tuned" in page.text_content("#chat-notice")

            # Chat: the reply streams in (several content events) and the status reports it.
            _set_slider(page, "#chat-max-tokens", "24")
            page.fill("#chat-seed", "1")
            page.fill("#chat-input", "Tell me about the little cat")
            page.click("#chat-send")
            page.wait_for_function("document.querySelector('#chat-status').textContent.includes('tokens in')",
                                   timeout=30_000)
            reply = page.text_content(".msg.assistant .content")
            assert reply and int(page.get_attribute(".msg.assistant", "data-chunks")) >= 2
            assert "error" not in page.get_attribute(".msg.assistant", "class")
            page.screenshot(path=str(tmp_path / "chat.png"))

            # Live sampler: distribution at T=1, then T=2 (flatter), then T=0 (one token).
            page.click("#tab-sampler")
            page.wait_for_selector(".bar-row")
            p1 = _bar_probs(page)
            h1 = page.text_content("#sampler-entropy")
            page.screenshot(path=str(tmp_path / "sampler_t1.png"))
            _set_slider(page, "#s-temperature", "2")
            _sampler_shows(page, "temperature", "2")
            p2 = _bar_probs(page)
            assert p2 != p1 and p2[0] < p1[0]                 # hotter: top token loses mass
            assert page.text_content("#sampler-entropy") != h1
            _set_slider(page, "#s-temperature", "0")
            _sampler_shows(page, "temperature", "0")
            p0 = _bar_probs(page)
            assert p0[0] == 1.0 and all(q == 0.0 for q in p0[1:])
            assert page.text_content("#sampler-entropy").startswith("0.000")
            assert page.text_content("#sampler-kept").startswith("1 of")
            page.screenshot(path=str(tmp_path / "sampler_t0.png"))
            _set_slider(page, "#s-temperature", "1")
            _set_slider(page, "#s-top-k", "3")
            _sampler_shows(page, "top_k", "3")
            assert sum(q > 0 for q in _bar_probs(page)) == 3
            assert page.text_content("#sampler-kept") == f"3 of {server.state.engine.model.config.vocab_size}"

            # Token visualizer: one span per token, ids as the tokenizer gives them.
            page.click("#tab-tokens")
            page.fill("#tok-input", "hello world, the cat")
            page.wait_for_function("document.querySelectorAll('.tok').length > 0 && "
                                   "document.querySelector('#tok-ids').textContent.length > 2")
            page.wait_for_timeout(400)                        # debounce of the input handler
            ids = json.loads(page.text_content("#tok-ids"))
            assert ids == server.state.tokenizer.encode("hello world, the cat")
            assert page.eval_on_selector_all(".tok", "s => s.length") == len(ids)
            # a character cut into byte tokens is one span, shown as itself, never as U+FFFD
            page.fill("#tok-input", "cat 🙂")
            page.wait_for_function("document.querySelector('#tok-spans').textContent === 'cat 🙂'")
            n_ids = len(server.state.tokenizer.encode("cat 🙂"))
            assert page.eval_on_selector_all(".tok", "s => s.length") < n_ids
            assert page.eval_on_selector_all(".tok.multi", "s => s.map(x => x.textContent)") == ["🙂"]
            page.screenshot(path=str(tmp_path / "tokens.png"))

            # Attention: one heatmap per head of the chosen layer, drawn on canvases.
            page.click("#tab-attention")
            prompt = "Q: where is the cat?\nA: on the mat"              # several lines
            page.fill("#att-prompt", prompt)
            page.click("#att-run")
            page.wait_for_selector(".att-cell canvas")
            n_tok = len(server.state.tokenizer.encode(prompt))
            assert page.text_content("#att-status").startswith(f"{n_tok} tokens")
            n_head = server.state.engine.model.config.n_head
            assert page.eval_on_selector_all(".att-cell", "c => c.length") == n_head
            painted = page.eval_on_selector("#att-canvas", """c => {
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let coloured = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] !== 255 || d[i+1] !== 255 || d[i+2] !== 255) coloured++;
                return coloured; }""")
            assert painted > 1000
            page.screenshot(path=str(tmp_path / "attention.png"))
        finally:
            browser.close()
            marker.unlink()
    assert errors == []
    print(f"screenshots in {tmp_path}")
