"""`mlflow ui` in a real browser (headless Chromium driven by Selenium) shows what train.py logged.

Needs Debian's `chromium` and `chromium-driver` (apt-get install chromium chromium-driver); without
them the test is skipped with that one line. Screenshots go to a temporary folder, printed.
"""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import TINY
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

import train

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="no browser: apt-get install chromium chromium-driver",
    ),
]


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def ui(store, tmp_path):
    """`mlflow ui` on the test's store, on 127.0.0.1; yields its address, stopped afterwards."""
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", store.tracking_uri]
    server = subprocess.Popen(
        command,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow ui did not start") from None
                time.sleep(0.5)
        yield address
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture()
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _page(browser, url, *texts, timeout=60):
    """Open `url` and wait until the page shows every one of `texts`; returns the page's text."""
    browser.get(url)
    WebDriverWait(browser, timeout).until(
        lambda driver: all(text in driver.find_element("tag name", "body").text for text in texts)
    )
    return browser.find_element("tag name", "body").text


def test_the_ui_shows_the_run_its_epoch_charts_and_its_figures(
    store, ui, browser, tmp_path_factory
):
    train.main(TINY + ["--epochs", "2"])
    experiment = store.get_experiment_by_name("tiny")
    run = store.search_runs([experiment.experiment_id])[0]
    shots = tmp_path_factory.mktemp("mlflow-ui-screenshots")
    base = f"{ui}/#/experiments/{experiment.experiment_id}"

    # The experiment's runs, in the "Model training" view (MLflow 3 opens on its GenAI view).
    _page(browser, f"{base}?workflowType=machine_learning", "Runs", run.info.run_name)
    browser.save_screenshot(str(shots / "runs.png"))

    # One chart per metric, against the step (the epoch); charts below the fold are drawn lazily.
    _page(
        browser,
        f"{base}/runs/{run.info.run_id}/model-metrics",
        f"{run.info.run_name} (dice)",
        "Step",
    )
    browser.save_screenshot(str(shots / "model-metrics.png"))

    # The logged figures, listed and rendered: each one clicked in the artifact tree.
    _page(browser, f"{base}/runs/{run.info.run_id}/artifacts", "training_curves.png")
    for figure in ("training_curves.png", "test_predictions.png"):
        browser.find_element("xpath", f"//*[text()='{figure}']").click()
        WebDriverWait(browser, 30).until(
            lambda driver, figure=figure: driver.execute_script(
                "return [...document.images].some("
                "i => i.complete && i.naturalWidth > 300 && i.alt === arguments[0])",
                figure,
            )
        )
        browser.save_screenshot(str(shots / figure))
    print(f"\nscreenshots of mlflow ui: {shots}")
