"""The browser playground in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
selenium): a sam3-image job, a sam-3d-body job and a sam-3d-objects job with a mask, run from the page as
a user would.

Screenshots of each page state go to the test's tmp directory; their paths are printed (pytest -s).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from server import playground
from server.auth import ApiKeys
from tests.conftest import noise_image
from tests.server_process import ServerProcess

KEY = "playground-key"
HEIGHT, WIDTH = 240, 320
INSTALL_HINT = "headless Chromium is missing: `make test` installs it (apt-get install chromium chromium-driver)"
JOB_TIMEOUT = 60


@pytest.fixture(scope="module")
def server(all_weights_dir, tmp_path_factory):
    proc = ServerProcess(all_weights_dir, tmp_path_factory.mktemp("playground") / "data", "--api-key", KEY).start()
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("playground-inputs")
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[40:200, 110:190] = 255
    paths = {"image": folder / "image.png", "mask": folder / "mask.png"}
    Image.fromarray(noise_image(HEIGHT, WIDTH, seed=5)).save(paths["image"])
    Image.fromarray(mask).save(paths["mask"])
    return paths


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("playground-screenshots")


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(INSTALL_HINT)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # SwiftShader gives headless Chromium the WebGL that the 3D viewer needs, on machines without a GPU.
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1400,1100", "--enable-unsafe-swiftshader"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(driver))
    yield browser
    browser.quit()


def console(browser) -> str:
    return "\n".join(entry["message"] for entry in browser.get_log("browser"))


def wait(browser, condition, what: str, timeout: float = JOB_TIMEOUT):
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.1).until(condition)
    except Exception:
        error = browser.find_element(By.ID, "error").text
        pytest.fail(f"{what} did not happen in {timeout} s; page error: {error!r}\nconsole:\n{console(browser)}")


def image_loaded(browser, element_id: str) -> bool:
    script = "const i = document.getElementById(arguments[0]); return Boolean(i && i.complete && i.naturalWidth > 0);"
    return browser.execute_script(script, element_id)


def snap(browser, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")


def open_playground(browser, server) -> None:
    browser.get(f"{server.url}/")  # redirects to /playground
    assert browser.current_url.endswith("/playground")
    key = browser.find_element(By.ID, "api-key")
    if key.get_attribute("value") != KEY:  # the page keeps the key in localStorage
        key.send_keys(KEY + "\t")  # leaving the field stores the key and loads the models with it
    wait(browser, lambda b: b.find_element(By.ID, "params").get_attribute("data-model"), "the form", timeout=10)


def choose_model(browser, model: str) -> None:
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    wait(browser, lambda b: b.find_element(By.ID, "params").get_attribute("data-model") == model, model, timeout=10)


def finished_state(browser) -> str | None:
    state = browser.find_element(By.ID, "status").get_attribute("data-state")
    return state if state in ("COMPLETED", "FAILED", "ERROR") else None


def run_job(browser, folder: Path, name: str) -> None:
    snap(browser, folder, f"{name}-1-form")
    browser.find_element(By.ID, "submit").click()
    status = browser.find_element(By.ID, "status")
    wait(browser, lambda b: status.get_attribute("data-state") != "SUBMITTING", f"{name}: the submit", timeout=10)
    snap(browser, folder, f"{name}-2-running")
    state = wait(browser, finished_state, f"{name}: the job finishing")
    assert state == "COMPLETED", browser.find_element(By.ID, "error").text


def test_sam3_image_job_shows_the_preview_and_the_masks(browser, server, pictures, screenshots):
    open_playground(browser, server)
    choose_model(browser, "sam3-image")
    browser.find_element(By.ID, "image-file").send_keys(str(pictures["image"]))
    browser.find_element(By.ID, "param-text_prompt").send_keys("a cat")
    threshold = browser.find_element(By.ID, "param-threshold")
    threshold.clear()
    threshold.send_keys("0.1")
    run_job(browser, screenshots, "sam3-image")

    wait(browser, lambda b: image_loaded(b, "preview"), "the preview image loading", timeout=10)
    assert browser.find_element(By.ID, "mask-count").text.startswith("Masks: ")
    links = [a.get_attribute("download") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")]
    assert links == ["preview.png"]
    snap(browser, screenshots, "sam3-image-3-result")


def test_sam_3d_body_job_shows_the_mesh_in_the_3d_viewer(browser, server, pictures, screenshots):
    open_playground(browser, server)
    choose_model(browser, "sam-3d-body")
    browser.find_element(By.ID, "image-file").send_keys(str(pictures["image"]))
    browser.find_element(By.ID, "param-mask").send_keys(str(pictures["mask"]))
    Select(browser.find_element(By.ID, "param-inference_mode")).select_by_value("body")
    run_job(browser, screenshots, "sam-3d-body")

    wait(browser, lambda b: b.find_element(By.ID, "viewer").get_attribute("data-loaded") == "true", "the GLB loading")
    assert browser.execute_script("return document.getElementById('viewer').loaded") is True
    wait(browser, lambda b: image_loaded(b, "visualization"), "the visualization loading", timeout=10)
    assert browser.find_element(By.ID, "people-count").text == "People: 1"
    links = {a.get_attribute("download") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")}
    assert {"visualization.png"} < links and any(name.endswith(".glb") for name in links)
    snap(browser, screenshots, "sam-3d-body-3-result")


def test_sam_3d_objects_job_shows_the_scene_its_metadata_and_every_file(browser, server, pictures, screenshots):
    open_playground(browser, server)
    choose_model(browser, "sam-3d-objects")
    browser.find_element(By.ID, "image-file").send_keys(str(pictures["image"]))
    browser.find_element(By.ID, "param-mask").send_keys(str(pictures["mask"]))
    Select(browser.find_element(By.ID, "param-preset")).select_by_value("fast")
    browser.find_element(By.ID, "param-include_artifacts").click()
    run_job(browser, screenshots, "sam-3d-objects")

    wait(browser, lambda b: b.find_element(By.ID, "viewer").get_attribute("data-loaded") == "true", "the GLB loading")
    assert browser.execute_script("return document.getElementById('viewer').loaded") is True
    assert browser.find_element(By.ID, "objects-count").text == "Objects: 1"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#objects tr")) == 2  # the header and object 0
    links = {a.get_attribute("download") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")}
    assert links == {"scene.glb", "scene.ply", "artifacts.zip"}
    snap(browser, screenshots, "sam-3d-objects-3-result")


def test_a_missing_viewer_is_a_404_naming_the_install_step(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(playground.VENDOR, "model-viewer.min.js", tmp_path / "absent.js")
    app = FastAPI()
    app.include_router(playground.build_router(SimpleNamespace(keys=ApiKeys([KEY]))))
    client = TestClient(app)
    with caplog.at_level(logging.ERROR):
        response = client.get("/playground/vendor/model-viewer.min.js")
    assert response.status_code == 404 and "make playground" in response.json()["error"]
    assert "absent.js is missing" in caplog.text
    assert client.get("/playground").status_code == 200  # the page itself needs no key
    assert client.get("/playground/__init__.py").status_code == 404
    assert client.get("/models/sam3-image/schema").status_code == 401
    schema = client.get("/models/sam-3d-body/schema", headers={"x-api-key": KEY}).json()
    assert schema["mask_params"] == ["mask"] and "max_people" in schema["schema"]["properties"]
    schema = client.get("/models/sam-3d-objects/schema", headers={"x-api-key": KEY}).json()
    assert schema["mask_params"] == ["mask"] and "preset" in schema["schema"]["properties"]
