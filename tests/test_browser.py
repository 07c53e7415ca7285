"""The 06 demo in a real browser: Voila serves it, Chromium (driven by playwright) clicks Run.

Needs Debian's ``chromium`` and ``fonts-noto-cjk`` (``make test`` installs them
when it can). Without them this test FAILS with the command to run, unless the
run opted out explicitly (``make test BROWSER=0`` sets ``KNOWLM_BROWSER=0``);
CI (``CI=true``) never opts out.
"""
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from knowlm_nb import ROOT, ie, launch, widgets

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium fonts-noto-cjk   (as root; or: make test)"
SHOTS = ROOT / "runs" / "tiny" / "06" / "browser"


def _missing() -> list[str]:
    missing = [] if Path(CHROMIUM).is_file() else ["chromium"]
    fonts = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True) \
        if shutil.which("fc-list") else None
    if fonts is None or "Noto Sans CJK" not in fonts.stdout:
        missing.append("fonts-noto-cjk")
    return missing


@pytest.fixture(scope="module")
def browser_ready():
    missing = _missing()
    if missing:
        opted_out = os.environ.get("KNOWLM_BROWSER") == "0" and os.environ.get("CI") != "true"
        if opted_out:
            pytest.skip(f"browser test opted out (BROWSER=0); missing {missing}")
        pytest.fail(f"the browser test needs {', '.join(missing)}: run  {INSTALL}  "
                    "(or opt out with make test BROWSER=0)")


def _models_args() -> dict:
    """The tiny run's models when notebooks 00 and 03 ran, else the shipped base alone."""
    run = ROOT / "runs" / "tiny"
    base = run / "00" / "base"
    args = {"base": str(base if (base / "config.json").is_file() else ROOT / "data_samples" / "tiny_base")}
    adapter = run / "03" / "adapter"
    if (adapter / "adapter_config.json").is_file():
        args["adapter"] = str(adapter)
    return args


@pytest.fixture(scope="module")
def voila_page(browser_ready):
    import httpx

    SHOTS.mkdir(parents=True, exist_ok=True)
    args = _models_args()
    nb = widgets.write_demo_notebook(SHOTS / "demo.ipynb", **args)
    port, token = launch.free_port(), "knowlm-test-token"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(widgets.serve_command(nb, port, token), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(SHOTS / "voila.log", "wb"))
    url = f"http://127.0.0.1:{port}/?token={token}"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"voila exited: {(SHOTS / 'voila.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, args
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _shot(page, selector: str) -> bytes:
    return page.locator(selector).first.screenshot()


def _ink(png: bytes) -> int:
    """Distinct colours in a screenshot (a blank box has a couple, glyphs many)."""
    from PIL import Image

    return len(Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 24))


def test_demo_in_chromium_runs_and_renders_chinese(voila_page):
    from playwright.sync_api import sync_playwright

    url, args = voila_page
    example = ie.eval_subset("NER", "zh", 1)[0]
    sentence = example["input"]
    # what the same models answer headless, to compare the browser's table with
    models = widgets.Models(args["base"], args.get("adapter"))
    name = models.available()[-1]
    prompt, _ = widgets.prepare(sentence, "NER", "zh", "", "tuple")
    preset = "greedy + copy constraint"  # well-formed answers, and quick
    expected = widgets.run_request(prompt, [name], preset,
                                   lambda n, ex, p: models.answer(n, [ex], p)[0])[name]
    expected_rows = [[r[0], r[1]] for r in expected["records"]]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            t0 = time.time()
            page.goto(url, timeout=90_000)
            page.wait_for_selector("textarea", timeout=90_000)
            page.locator("textarea").first.fill(sentence)
            selects = page.locator("select")  # example, task, language, style, decoding, model
            selects.nth(2).select_option(label="zh")
            selects.nth(4).select_option(label=preset)
            print(f"page ready {time.time() - t0:.1f}s", file=sys.stderr)
            page.get_by_role("button", name="Run").click()
            page.wait_for_selector(".ie-table", timeout=180_000)
            print(f"table {time.time() - t0:.1f}s", file=sys.stderr)
            rows = [[c.inner_text() for c in r.locator("td").all()]
                    for r in page.locator(".ie-row").all()]
            page.screenshot(path=str(SHOTS / "demo.png"), full_page=True)
            marked = ".ie-span" if page.locator(".ie-span").count() else ".ie-text"
            span_png = _shot(page, marked)
            (SHOTS / "span.png").write_bytes(span_png)
            # real glyphs: two different Chinese strings look different (tofu boxes look alike)
            page.evaluate("""() => { for (const [id, t] of [["ka", "张三丰"], ["kb", "李四海"]]) {
                const d = document.createElement('div'); d.id = id; d.textContent = t;
                d.style.cssText = 'font-size:32px;display:inline-block;background:#fff;color:#000';
                document.body.prepend(d); } }""")
            a, b = _shot(page, "#ka"), _shot(page, "#kb")
        finally:
            browser.close()
    assert rows == expected_rows
    if "adapter" in args:
        assert rows, "the tuned model found nothing in the browser"
    assert (SHOTS / "demo.png").stat().st_size > 10_000
    assert a != b, "Chinese renders as identical boxes: install fonts-noto-cjk"
    assert _ink(a) > 20 and _ink(span_png) > 20
