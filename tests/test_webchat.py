"""Pages in a real headless Chromium: the web chat (load, send, watch the streamed reply) and the
`ownllm explain` page, each screenshotted.

Needs Debian's chromium + chromium-driver and the selenium package (`.ci/run` installs them, so
CI always runs this). Elsewhere it is skipped with the reason. The screenshots are written to
test-artifacts/ (webchat.png, explain_en.png, explain_zh.png; or $OWNLLM_TEST_ARTIFACTS).
"""
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import ScriptedBatcher, server_state as _state, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium not installed (make test installs it)")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no chromium/chromedriver found (Debian: apt-get install chromium chromium-driver)")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700", "--lang=zh-CN"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield drv
    drv.quit()


def test_page_streams_a_reply_and_renders_markdown(run_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    state = _state(run_dir)
    tok = state.tok
    real = state.batcher
    reply = "**Hello** from ownllm, 你好世界！\n\n- one\n- two"
    state.batcher = ScriptedBatcher(tok.encode(reply), delay=0.02)  # the page's plumbing is real, the words scripted
    with start_server(state) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model").text == "base")
        box = browser.find_element(By.ID, "input")
        box.send_keys("你好, who are you?")
        box.send_keys(Keys.ENTER)
        # mid-stream: the reply grows before it is done
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-streaming='1']"))
        seen_partial = False
        t0 = time.time()
        while time.time() - t0 < 10 and not browser.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"):
            text = browser.find_element(By.CSS_SELECTOR, ".assistant").text
            seen_partial |= 0 < len(text) < len("Hello from ownllm")
            time.sleep(0.005)
        done = browser.find_element(By.CSS_SELECTOR, ".assistant[data-done='1']")
        assert "你好世界" in done.text and done.find_element(By.TAG_NAME, "strong").text == "Hello"
        assert [li.text for li in done.find_elements(By.TAG_NAME, "li")] == ["one", "two"]
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "你好, who are you?"
        assert seen_partial, "the reply should appear piece by piece"
        assert browser.find_element(By.ID, "error").text == ""
        # "why?": the reply read back through the model (POST /v1/explain), a shaded span per token
        done.find_element(By.CSS_SELECTOR, ".whybtn").click()
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant .why .tok"))
        spans = browser.find_elements(By.CSS_SELECTOR, ".assistant .why .tok")
        assert len(spans) == len(tok.encode_text(reply)) and "p = " in spans[0].get_attribute("title")
        assert "least certain" in browser.find_element(By.CSS_SELECTOR, ".why .alts").text
        lens = browser.find_element(By.CSS_SELECTOR, ".why .lens")
        lens.find_element(By.TAG_NAME, "summary").click()           # the logit lens: a row per layer, a cell per token
        rows = lens.find_elements(By.CSS_SELECTOR, "tr")
        assert len(rows) == 1 + state.model.config.n_layers and len(rows[1].find_elements(By.TAG_NAME, "td")) == len(spans)
        # attention: clicking reply token 2 maps, per layer, its weights over the context (the prompt and tokens 0-1)
        spans[2].click()
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".why .attn[open] tr"))
        attn = browser.find_element(By.CSS_SELECTOR, ".why .attn")
        rows = attn.find_elements(By.CSS_SELECTOR, "tr")
        n_ctx = len(tok.render([{"role": "user", "content": "你好, who are you?"}], add_generation_prompt=True).ids) + 2
        assert len(rows) == 1 + state.model.config.n_layers and len(rows[1].find_elements(By.TAG_NAME, "td")) == n_ctx
        assert "chosen" in spans[2].get_attribute("class") and "token 2" in attn.find_element(By.TAG_NAME, "summary").text
        mean = [c.get_attribute("title") for c in rows[1].find_elements(By.TAG_NAME, "td")]
        from selenium.webdriver.support.ui import Select
        Select(attn.find_element(By.TAG_NAME, "select")).select_by_index(1)   # head 1 alone
        head = [c.get_attribute("title") for c in attn.find_elements(By.CSS_SELECTOR, "tr")[1].find_elements(By.TAG_NAME, "td")]
        assert len(head) == n_ctx and head != mean
        browser.execute_script("arguments[0].scrollIntoView()", attn)   # the screenshot shows the map
        assert browser.find_element(By.ID, "error").text == ""
        out = Path(os.environ.get("OWNLLM_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
        out.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out / "webchat.png"))
    state.batcher = real
    real.close()


@pytest.mark.parametrize("lang,prompt", [("en", "What is 48 + 27?"), ("zh", "把 305 写成中文数字。")])
def test_explain_page_renders_in_the_browser(run_dir, browser, tmp_path, lang, prompt):
    from selenium.webdriver.common.by import By

    from ownllm.evaluation.explain import explain, write_explanation

    res = explain(run_dir, prompt, max_new_tokens=8)
    page = write_explanation(res, tmp_path)["html"]
    browser.get(page.as_uri())
    assert browser.find_element(By.ID, "prompt").text == prompt
    assert len(browser.find_elements(By.CSS_SELECTOR, "#steps tr")) == len(res["steps"]) + 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#lens tr")) == len(res["lens"]) + 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#reply .tok")) == len(res["steps"])
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 2 and all(browser.execute_script("return arguments[0].naturalWidth", i) > 100 for i in images)
    out = Path(os.environ.get("OWNLLM_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(out / f"explain_{lang}.png"))
