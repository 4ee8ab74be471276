"""`clrface serve` end to end in headless Chromium: upload through the page's file input, click Restore, wait for
the restored image. Needs Debian's chromium + chromium-driver and selenium (`pip install -e .[browser]`); run with
`pytest -m browser` (.ci/run installs them when apt can). Selenium is given both executables' paths, so it never
looks for or downloads a browser or driver (Selenium Manager stays unused; SE_OFFLINE as a second guard)."""

import io
import os
import shutil
import threading

import pytest
import torch
from PIL import Image

from clrface.restorer import Restorer
from clrface.serve import make_server

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CLRFACE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = os.environ.get("CLRFACE_CHROMEDRIVER") or shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    srv = make_server(Restorer.from_pretrained(), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e .[browser])")
    if not (CHROMIUM and DRIVER):
        pytest.skip("chromium / chromedriver not found (apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    drv.set_page_load_timeout(30)
    drv.set_script_timeout(30)
    yield drv
    drv.quit()


def test_upload_restore_download(server, browser, tmp_path, demo_upload):
    # selenium is optional (the browser extra): imported here, so the default run collects this file without it
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    photo = tmp_path / "astronaut_lq.jpg"
    photo.write_bytes(demo_upload)
    browser.get(server.url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "mode").get_attribute("value") == "irn")  # /api/info arrived
    browser.find_element(By.ID, "file").send_keys(str(photo))
    browser.find_element(By.ID, "restore").click()
    after = wait.until(lambda d: d.find_element(By.ID, "after") if d.execute_script(
        "const i = document.getElementById('after'); return i.complete && i.naturalWidth > 0") else False)
    assert browser.find_element(By.ID, "error").text == ""
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", after) == [256, 256]
    assert browser.execute_script("return document.getElementById('before').naturalWidth") == 256
    rows = browser.find_elements(By.CSS_SELECTOR, "#faces tbody tr")
    assert len(rows) == 1
    cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
    assert 0.9 < float(cells[3]) <= 1.0 and float(cells[4]) == pytest.approx(1.0, abs=2e-3)  # vs input, vs IRN
    link = browser.find_element(By.ID, "download")
    assert link.get_attribute("href").startswith("blob:")
    assert link.get_attribute("download") == "astronaut_lq_irn.png"
    # The download link holds the PNG the server made: fetch the blob inside the page and compare the size.
    n = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById('download').href).then(r => r.arrayBuffer()).then(b => done(b.byteLength));")
    assert n > 10_000
    status = browser.find_element(By.ID, "status").text
    assert "face(s) restored" in status and "Warning" not in status  # mode irn is sent no sampling options
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert Image.open(io.BytesIO(shot.read_bytes())).size[0] > 0
    if os.environ.get("CLRFACE_SCREENSHOT"):
        shutil.copy(shot, os.environ["CLRFACE_SCREENSHOT"])


def test_page_shows_refusal_and_no_earlier_result_beside_it(server, browser, tmp_path, demo_upload):
    # selenium is optional (the browser extra): imported here, so the default run collects this file without it
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    good, bad = tmp_path / "astronaut_lq.jpg", tmp_path / "notes.png"
    good.write_bytes(demo_upload)
    bad.write_bytes(b"this is not a picture")
    browser.get(server.url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "mode").get_attribute("value"))
    assert not browser.find_element(By.ID, "pair").is_displayed()  # no empty image frames before a result
    browser.find_element(By.ID, "file").send_keys(str(good))
    browser.find_element(By.ID, "restore").click()
    wait.until(lambda d: d.find_element(By.ID, "pair").is_displayed())
    assert browser.find_element(By.ID, "status").text.startswith("astronaut_lq.jpg: 1 face(s) restored in ")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    browser.find_element(By.ID, "restore").click()
    msg = wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert "not an image" in msg
    assert not browser.find_element(By.ID, "pair").is_displayed()
    assert not browser.find_element(By.ID, "faces").is_displayed()


def test_upload_with_a_reference_photo(server, browser, tmp_path, demo_upload):
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    photo, ref = tmp_path / "astronaut_lq.jpg", tmp_path / "astronaut_ref.jpg"
    photo.write_bytes(demo_upload)
    ref.write_bytes(demo_upload)
    browser.get(server.url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.ID, "mode").get_attribute("value") == "irn")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    browser.find_element(By.ID, "ref").send_keys(str(ref))
    mode = browser.find_element(By.ID, "mode")
    assert mode.get_attribute("value") == "full" and not mode.is_enabled()  # what the request will use
    browser.find_element(By.ID, "restore").click()
    wait.until(lambda d: "face(s) restored" in d.find_element(By.ID, "status").text
               or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    assert "mode full" in browser.find_element(By.ID, "status").text
    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#faces tbody tr")[0].find_elements(By.TAG_NAME,
                                                                                                        "td")]
    assert cells[5].startswith("used (input vs reference 1.000")  # the same picture as reference
