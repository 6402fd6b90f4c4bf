"""The report and the token viewer in a real browser: headless Chromium (Debian's /usr/bin/chromium, or
$RHO1_CHROMIUM) driven by Playwright. `make test` installs Chromium when it is missing."""

import os
import shutil
from pathlib import Path

import pytest
from conftest import SEQ_LEN
from test_analysis import HOSTILE

from rho1.analysis.report import ReportConfig, report
from rho1.analysis.viewer import ViewConfig, build_view, view
from rho1.data.prepare import PrepareConfig, prepare
from rho1.train import TrainConfig, train

CHROMIUM = os.environ.get("RHO1_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make test` (it installs Debian's chromium) or set RHO1_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def _open(browser, path: Path):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, requests, errors


def _assert_safe(page, requests):
    assert page.evaluate("window.__pwned") is None  # no injected script or event handler ran
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing from the network
    text = page.locator(".tokens").first.inner_text()
    assert "<script>window.__pwned = 1</script>" in text and "</span></div>" in text  # shown as text
    assert "U+202E" in text and "U+0000" in text


def test_viewer_and_report_from_a_hostile_corpus_in_chromium(browser, stores, reference_model, tmp_path):
    (tmp_path / "hostile.txt").write_text(HOSTILE)
    hostile = prepare(PrepareConfig([str(tmp_path / "hostile.txt")], str(tmp_path / "hostile"),
                                    tokenizer=str(stores["corpus"].path)), progress=False)
    view_cfg = ViewConfig(data=str(hostile.path), model=[str(reference_model)], reference=str(reference_model),
                          seq_len=SEQ_LEN, windows=3, ratio=0.4, out=str(tmp_path / "view.html"))
    numbers = view(view_cfg, progress=False)

    page, requests, errors = _open(browser, tmp_path / "view.html")
    _assert_safe(page, requests)
    assert page.locator(".tokens .t.selected").count() == numbers["selected"] > 0
    assert page.locator(".tokens .t").count() == numbers["tokens"] == 3 * SEQ_LEN
    title = page.locator(".tokens .t.selected").first.get_attribute("title")
    assert title.startswith("learner ") and " · reference " in title and " · excess " in title
    assert not errors

    runs = []
    for objective in ("clm", "slm"):
        out = tmp_path / objective
        train(TrainConfig(data=str(stores["corpus"].path), out=str(out), model=str(reference_model), seq_len=SEQ_LEN,
                          batch_size=8, max_tokens=2048, eval_every=1024, objective=objective,
                          reference=str(reference_model), eval_data=[str(stores["heldout"].path)]), progress=False)
        runs.append(str(out))
    fragment, _ = build_view(view_cfg)
    report(ReportConfig(runs=runs, out=str(tmp_path / "report.html")), fragment, progress=False)
    page, requests, errors = _open(browser, tmp_path / "report.html")
    _assert_safe(page, requests)
    assert page.locator("table.summary tr").count() == 3  # header + 2 runs
    assert page.locator("table.summary").inner_text().count("clm") >= 1
    n_images = page.locator("img").count()
    assert n_images >= 5
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator(".tokens .t.selected").count() == numbers["selected"]
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert not errors
