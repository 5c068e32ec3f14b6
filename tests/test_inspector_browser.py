"""The inspector's dashboard in a real browser: Debian's chromium, headless, driven by Selenium through the system
chromedriver. Missing browser packages are installed with apt-get where the tests run as root (CI); elsewhere the
tests are skipped with the reason. Screenshots are kept under the test's tmp dir; with
EDGEINSPECT_DOCS_SCREENSHOT=1 the first one also replaces docs/inspector.png (the README's)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SYNTH_CATEGORY
from inspector_support import RUN_IMAGE_AUROC, copy_bundle, copy_registry, seed_registry, serving

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from edgeinspect.inspector.app import create_app  # noqa: E402

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "inspector.png"
BROWSERS = (("chromium", "chromium-browser"), ("chromedriver",))


def _find() -> tuple[str | None, str | None]:
    found = [next((p for name in names if (p := shutil.which(name))), None) for names in BROWSERS]
    return found[0], found[1]


def _install() -> str:
    """apt-get install chromium chromium-driver (root with apt-get only); what went wrong, or ''."""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return "chromium/chromedriver not found and not root with apt-get to install them " \
               "(apt-get install chromium chromium-driver)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)} timed out"
        if done.returncode:
            return f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return ""


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of the chromium binary and its chromedriver, installed first where they can be."""
    browser, driver = _find()
    if not (browser and driver):
        problem = _install()
        browser, driver = _find()
        if not (browser and driver):
            pytest.skip(f"no headless chromium for the browser tests: {problem or 'not found after installing'}")
    return browser, driver


@pytest.fixture()
def browser(chromium: tuple[str, str]) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1400"):
        options.add_argument(arg)
    options.binary_location = chromium[0]
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromium[1]), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _verdict(driver: webdriver.Chrome, card: int = 0) -> str:
    return driver.find_elements(By.CSS_SELECTOR, "#results .card .verdict")[card].text


def _png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # IHDR


def _loaded(driver: webdriver.Chrome, selector: str) -> list:
    """The images matching ``selector`` once every one of them has loaded (else an empty list)."""
    images = driver.find_elements(By.CSS_SELECTOR, selector)
    loaded = images and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                            for i in images)
    return images if loaded else []


def test_dashboard_upload_heatmap_and_threshold_flip(browser: webdriver.Chrome, patchcore_bundle: Path,
                                                     synth_root: Path, evaluated_run: dict, tmp_path: Path) -> None:
    test_dir = synth_root / SYNTH_CATEGORY / "test"
    defect = sorted(p for p in test_dir.glob("*/*.png") if p.parent.name != "good")[0]
    good = sorted(test_dir.glob("good/*.png"))[0]
    bundle = copy_bundle(patchcore_bundle, tmp_path)
    wait = WebDriverWait(browser, 60)
    registry = copy_registry(evaluated_run["registry"], tmp_path)  # an evaluate run with its report, and a train run
    seed_registry(registry)
    app = create_app([bundle], registry=registry)
    with serving(app) as url:
        browser.get(url + "/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model-select option"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#test-grid span"))
        assert "patchcore" in browser.find_element(By.ID, "model-info").text
        wait.until(lambda d: "train" in d.find_element(By.ID, "runs").text)  # the run list, with its metrics
        assert f"{RUN_IMAGE_AUROC:.4f}" in browser.find_element(By.ID, "runs").text

        # the evaluate run's report: its plots as thumbnails that open full size, and the HTML report
        report = evaluated_run["report"]
        thumbs = wait.until(lambda d: _loaded(d, "#runs a.plot img"))
        assert sorted(t.get_attribute("alt") for t in thumbs) == sorted(p.name for p in report.glob("*.png"))
        roc = next(t for t in thumbs if t.get_attribute("alt") == "roc.png")
        html_link = browser.find_element(By.CSS_SELECTOR, "#runs a.html-report")
        assert html_link.get_attribute("href").endswith(f"/api/runs/{evaluated_run['run_id']}/report/report.html")
        roc.click()
        wait.until(lambda d: len(d.window_handles) == 2)
        browser.switch_to.window(browser.window_handles[1])
        full = wait.until(lambda d: _loaded(d, "img"))[0]  # the PNG itself, full size
        assert browser.execute_script("return arguments[0].naturalWidth", full) == _png_width(report / "roc.png")
        browser.close()
        browser.switch_to.window(browser.window_handles[0])

        # upload a defective part: NOK, heatmap over the image, a box
        browser.find_element(By.ID, "file").send_keys(str(defect))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card .verdict")
                   and _verdict(d) in ("OK", "NOK", "ERROR"))
        assert _verdict(browser) == "NOK"
        heat = browser.find_element(By.CSS_SELECTOR, "#results .card img.heatmap")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat))
        assert heat.size["width"] > 100 and browser.find_elements(By.CSS_SELECTOR, "#results .card .box")
        precision = browser.find_element(By.ID, "precision").text
        assert float(precision) > 0.5 and float(browser.find_element(By.ID, "recall").text) > 0.5
        shots = [tmp_path / "inspector-nok.png", tmp_path / "inspector-flipped.png"]
        browser.save_screenshot(str(shots[0]))

        # a good part dropped on the drop zone (a real drop event carrying a File)
        browser.execute_script("""
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "good.png", {type: "image/png"}));
            document.querySelector("#drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer}));
        """, base64.b64encode(good.read_bytes()).decode())
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == 2
                   and _verdict(d, 0) in ("OK", "NOK"))

        # the slider to its top: the defective part flips to OK live, recall drops to 0
        slider = browser.find_element(By.ID, "threshold")
        slider.click()
        slider.send_keys(Keys.END)
        wait.until(lambda d: _verdict(d, 1) == "OK")
        assert "was NOK" in browser.find_elements(By.CSS_SELECTOR, "#results .card")[1].text
        assert browser.find_element(By.ID, "recall").text == "0.000"
        assert "flip" in browser.find_element(By.ID, "flips").text
        browser.save_screenshot(str(shots[1]))
        # to its bottom: every image NOK, recall 1
        slider.send_keys(Keys.HOME)
        wait.until(lambda d: _verdict(d, 0) == _verdict(d, 1) == "NOK")
        assert browser.find_element(By.ID, "recall").text == "1.000"

        # applied to the session: the server judges with it (the defective part OK, no longer "flipped")
        slider.send_keys(Keys.END)
        browser.find_element(By.ID, "apply").click()
        wait.until(lambda d: "for this session" in d.find_element(By.ID, "message").text)
        wait.until(lambda d: "(session override)" in d.find_element(By.ID, "model-info").text)
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#results .card.flipped"))
        assert _verdict(browser, 1) == "OK"
        assert app.state.inspector.model(None).predictor.threshold > app.state.inspector.model(None).base.threshold

        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    for shot in shots:
        assert shot.stat().st_size > 10_000
    if os.environ.get("EDGEINSPECT_DOCS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shots[0], DOCS_SCREENSHOT)


def test_dashboard_shows_a_daemons_live_verdicts(browser: webdriver.Chrome, tmp_path: Path) -> None:
    from conftest import free_tcp_endpoint

    from edgeinspect.runtime.publisher import VerdictPublisher

    endpoint = free_tcp_endpoint()
    wait = WebDriverWait(browser, 60)
    with VerdictPublisher(endpoint, "line1", "cam7") as publisher:
        app = create_app(daemon=endpoint, registry=tmp_path / "r.sqlite")
        try:
            publisher.wait_for_subscribers(1, timeout_s=30)
            with serving(app) as url:
                browser.get(url + "/")
                wait.until(lambda d: d.find_element(By.ID, "live-panel").is_displayed())
                assert "No model loaded" in browser.find_element(By.ID, "message").text
                wait.until(lambda d: "connected" in d.find_element(By.ID, "live-counts").text)  # EventSource open
                for verdict in ("OK", "NOK"):
                    publisher.publish_verdict({"verdict": verdict, "score": 0.9, "regions": []})
                wait.until(lambda d: "cam7" in d.find_element(By.ID, "live-nok").text)
                assert "NOK 1" in browser.find_element(By.ID, "live-counts").text
                browser.get("about:blank")  # closes the stream before the server stops
        finally:
            app.state.inspector.daemon.close()
