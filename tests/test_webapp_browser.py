"""The web app in a real browser: Debian's headless Chromium driven by selenium through chromedriver.

The page must load with no console errors, a filter must change the number of points to exactly what the payload
says, two clicked points must show side by side, and the report must work from ``file://``. Screenshots are kept
under build/test-artifacts/; docs/figures/webapp.png (in README) is a copy of webapp-h100.png. Without Chromium (or
selenium) the tests skip, except under CI (``CI`` set to true or 1, as CI services do), where they fail:
tests/run_all.sh installs Chromium there.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

from wattscope.analysis import synthetic_database  # noqa: E402
from wattscope.webapp.payload import RowFilter, build_payload  # noqa: E402
from wattscope.webapp.report import write_report  # noqa: E402
from wattscope.webapp.server import make_server  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
KERNELS = {
    "kernels": [
        {"name": "sm90_xmma_gemm_bf16bf16_bf16f32", "calls": 120, "time_s": 0.8, "energy_j": 300.0, "share": 0.6},
        {"name": "vectorized_elementwise_kernel", "calls": 300, "time_s": 0.2, "energy_j": 50.0, "share": 0.1},
    ],
    "power": {"t_s": [0.0, 0.02, 0.04, 0.06, 0.08], "power_w": [300.0, 610.0, 640.0, 620.0, 320.0]},
}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI must run the browser tests: tests/run_all.sh installs chromium and "
                    "chromium-driver)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed: pip install 'wattscope[test]'")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    for path, package in ((chromium, "chromium"), (driver_path, "chromium-driver")):
        if not os.access(path, os.X_OK):
            _unavailable(f"{path} is missing: apt-get install {package}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver's path is given, so selenium's manager never tries to download one (CI may be offline).
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_database(tmp_path_factory.mktemp("browser") / "synthetic.sqlite", n_models=30, seed=1,
                              first_kernels=KERNELS)


@pytest.fixture(scope="module")
def payload(database: Path) -> dict:
    return build_payload(database)


@pytest.fixture(scope="module")
def served(database: Path):
    server = make_server(database, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def open_page(driver, url: str, state: str = "ready") -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return document.body.getAttribute('data-state')") in ("ready", "error"))
    assert driver.execute_script("return document.body.getAttribute('data-state')") == state


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def shown_count(driver) -> int:
    text = driver.find_element("id", "count").text
    circles = driver.find_elements("css selector", "#chart circle.point")
    count = int(text.split(" of ")[0])
    assert count == len(circles), (text, len(circles))
    return count


def expected(payload: dict, query: str) -> int:
    return sum(1 for r in RowFilter.from_query(query).apply(payload["rows"]) if r["plotted"])


def click_download(driver, folder: Path) -> list[dict[str, str]]:
    """Click the page's download button and read the CSV the browser saved into ``folder`` (a new one)."""
    import csv
    import time

    folder.mkdir(parents=True)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    driver.find_element("id", "download").click()
    deadline = time.monotonic() + 15
    while not (done := [p for p in folder.iterdir() if p.suffix == ".csv"]):
        assert time.monotonic() < deadline, f"no download in {folder}: {list(folder.iterdir())}"
        time.sleep(0.05)
    assert [p.name for p in done] == ["wattscope-table.csv"]
    with done[0].open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def clear_search(driver) -> None:
    """Empty the search box as a user does (the page listens for input events), and leave it unfocused."""
    driver.execute_script("var s = document.getElementById('search'); s.value = '';"
                          "s.dispatchEvent(new Event('input')); s.blur();")


def screenshot(driver, name: str, height_px: int | None = None) -> Path:
    """The whole page (at most 4000 px tall), or its top ``height_px``, 1400 px wide, as build/test-artifacts/name."""
    from selenium.webdriver.common.action_chains import ActionChains

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ActionChains(driver).move_to_element(driver.find_element("tag name", "h1")).perform()  # no tooltip on the chart
    driver.execute_script("document.activeElement.blur()")  # no focus ring or caret in the picture
    if height_px is None:
        height_px = min(max(driver.execute_script("return document.documentElement.scrollHeight"), 1000), 4000)
    # The window's size includes its frame, even headless: ask for the frame on top of the page's height.
    frame_px = driver.execute_script("return window.outerHeight - window.innerHeight")
    driver.set_window_size(1400, height_px + frame_px)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"could not write {path}"
    driver.set_window_size(1400, 1000)
    return path


def test_page_loads_without_console_errors(browser, served, payload: dict) -> None:
    open_page(browser, served.url)
    assert console_errors(browser) == []
    assert shown_count(browser) == len(payload["rows"])
    # The formula and the fit's verdict are on the page.
    assert browser.find_element("id", "formula").text.startswith("wattscope energy-efficiency score, version")
    assert "double exponential" in browser.find_element("id", "verdict").text
    legend = browser.find_element("id", "legend").text
    assert "Pareto frontier of Synthetic H100" in legend


def test_filters_change_the_points_shown(browser, served, payload: dict, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    open_page(browser, served.url)
    total = shown_count(browser)
    browser.find_element("css selector", "#precision input[value=fp32]").click()
    query = "precision=bf16&precision=fp16"
    assert shown_count(browser) == expected(payload, query) < total
    assert browser.execute_script("return window.wattscope.filterQuery()") == query
    family = sorted({r["family"] for r in payload["rows"]})[2]
    Select(browser.find_element("id", "family")).select_by_value(family)
    query = f"family={family}&" + query
    assert shown_count(browser) == expected(payload, query) > 0
    browser.find_element("id", "reset").click()
    assert shown_count(browser) == total
    # Parameters and search, then the server's CSV for the page's own query holds exactly the rows shown.
    browser.find_element("id", "params-max").send_keys("20")
    browser.find_element("id", "search").send_keys("net bf16")
    query = browser.execute_script("return window.wattscope.filterQuery()")
    assert query == "params_max=20&q=net+bf16"
    n = shown_count(browser)
    assert n == expected(payload, query) > 0
    # The button downloads the server's CSV for the page's own query: exactly the rows shown.
    table = click_download(browser, tmp_path / "served")
    assert [r["config_key"] + r["unit_key"] for r in table] == [
        r["config_key"] + r["unit_key"] for r in RowFilter.from_query(query).apply(payload["rows"])]
    assert len(table) == n
    browser.find_element("css selector", "input[name=color-by][value=band]").click()
    legend = browser.find_element("id", "legend").text
    assert "A ≤ 1.25×" in legend and "G > 4×" in legend
    assert console_errors(browser) == []


def _clickable_point(driver, search: str):
    """Narrow the page to one point with the search box and return it (the search leaves one row)."""
    box = driver.find_element("id", "search")
    box.clear()
    box.send_keys(search)
    circles = driver.find_elements("css selector", "#chart circle.point")
    assert len(circles) == 1, (search, len(circles))
    return circles[0]


def test_two_selected_models_are_compared(browser, served, payload: dict) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, served.url)
    def search(row: dict) -> str:
        return f"{row['unit_key']} {row['precision']}"

    def unique(row: dict) -> bool:
        return expected(payload, "q=" + search(row).replace(" ", "+")) == 1

    first = payload["rows"][0]  # results id 1: the one with kernel data
    assert unique(first)
    second = next(r for r in payload["rows"] if r["family"] != first["family"] and r["precision"] == "bf16"
                  and unique(r))
    for row in (first, second):
        point = _clickable_point(browser, search(row))
        assert point.get_attribute("data-id") == str(row["id"])
        ActionChains(browser).move_to_element(point).perform()
        tooltip = browser.find_element("id", "tooltip")
        assert tooltip.is_displayed() and row["architecture"] in tooltip.text
        ActionChains(browser).move_to_element(point).click().perform()
    clear_search(browser)
    assert shown_count(browser) == len(payload["rows"])
    assert len(browser.find_elements("css selector", "#chart circle.point.selected")) == 2
    compare = browser.find_element("id", "compare")
    names = [th.text.strip("× \n") for th in compare.find_elements("css selector", "thead th.model-name")]
    assert names == [first["architecture"], second["architecture"]]
    text = compare.text
    assert "Comparison" in text and "sm90_xmma_gemm_bf16bf16_bf16f32" in text
    assert "300 J · 60.0 %" in text  # a kernel's energy with its unit, and its share
    assert "bf16:" in text  # the first model's saving of bf16 against its fp32 row
    assert "not measured" in text  # the second has no kernel data nor power timeline
    assert len(compare.find_elements("css selector", "svg[aria-label='power timeline']")) == 1
    browser.execute_script("window.scrollTo(0, 0)")
    path = screenshot(browser, "webapp-compare.png")
    assert path.stat().st_size > 10_000
    assert console_errors(browser) == []


def test_report_works_from_a_file(browser, database: Path, payload: dict, tmp_path: Path) -> None:
    out = write_report(database, tmp_path / "report.html")
    open_page(browser, out.as_uri())
    assert console_errors(browser) == []
    assert shown_count(browser) == len(payload["rows"])
    browser.find_element("css selector", "#batch input[value='64']").click()
    query = "batch=1&batch=256"
    assert browser.execute_script("return window.wattscope.filterQuery()") == query
    assert shown_count(browser) == expected(payload, query) > 0
    # Without a server the page writes the CSV itself: the same rows and columns as the server's.
    table = click_download(browser, tmp_path / "report")
    rows = RowFilter.from_query(query).apply(payload["rows"])
    assert [r["unit_key"] for r in table] == [r["unit_key"] for r in rows]
    assert list(table[0]) == payload["columns"]
    assert float(table[0]["energy_per_image_j"]) == rows[0]["energy_per_image_j"]
    assert table[0]["baseline"] == str(int(rows[0]["baseline"]))


HOSTILE = '<img src=x onerror="window.injected=1">'


def test_strings_from_the_database_are_text_not_html(browser, database: Path, tmp_path: Path) -> None:
    """A GPU name and a kernel name (which a traced model's code chooses) holding markup show as text, run nothing."""
    db = tmp_path / "hostile.sqlite"
    shutil.copy(database, db)
    kernels = {"kernels": [{"name": HOSTILE + "</script>", "energy_j": 1.0}]}
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE results SET gpu_name = ?", (HOSTILE,))
        conn.execute("UPDATE results SET kernels_json = ? WHERE id IN (1, 2)", (json.dumps(kernels),))
    conn.close()
    out = write_report(db, tmp_path / "hostile.html")
    open_page(browser, out.as_uri())
    assert browser.execute_script("return window.injected === undefined && document.querySelectorAll("
                                  "'img').length === 0")
    assert browser.find_element("id", "gpu").text.strip() == "GPU\n" + HOSTILE
    assert HOSTILE in browser.find_element("id", "source").text
    for row_id in (0, 1):
        browser.execute_script("document.querySelector('circle.point[data-id=\"' + arguments[0] + '\"]')"
                               ".dispatchEvent(new MouseEvent('click', {bubbles: true}))", row_id)
    compare = browser.find_element("id", "compare").text
    assert compare.count(HOSTILE + "</script>") == 2 and compare.count(HOSTILE) >= 4
    assert browser.execute_script("return window.injected === undefined && document.querySelectorAll("
                                  "'img').length === 0")
    assert console_errors(browser) == []


def test_narrow_window_does_not_widen_the_page(browser, database: Path, tmp_path: Path) -> None:
    out = write_report(database, tmp_path / "narrow.html")
    try:
        browser.set_window_size(700, 1000)
        open_page(browser, out.as_uri())
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        assert browser.find_element("id", "chart").size["width"] <= 700
    finally:
        browser.set_window_size(1400, 1000)


def test_one_result_gets_a_labelled_energy_axis(browser, database: Path, tmp_path: Path) -> None:
    db = tmp_path / "one.sqlite"
    shutil.copy(database, db)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM results WHERE id > 1")
    conn.close()
    open_page(browser, write_report(db, tmp_path / "one.html").as_uri())
    assert browser.find_element("id", "count").text == "1 of 1 point shown"
    ticks = [t.text for t in browser.find_elements("css selector", "#chart text.x-tick")]
    assert len(ticks) >= 2 and all(t.endswith(("µJ", "mJ", " J")) for t in ticks), ticks
    assert console_errors(browser) == []


def test_shipped_h100_report_screenshot(browser, tmp_path: Path) -> None:
    """What a user sees first: the shipped H100 data, with two models selected."""
    shipped = Path(__file__).resolve().parents[1] / "data" / "h100" / "sweep.sqlite"
    if not shipped.is_file():
        pytest.skip("not a checkout of the repository: data/h100/sweep.sqlite is absent")
    out = write_report(shipped, tmp_path / "h100.html")
    open_page(browser, out.as_uri())
    assert console_errors(browser) == []
    for arch in ("convnextv2_large@224 fp32", "resnet50d@288 fp32"):  # each a single row of the shipped data
        point = _clickable_point(browser, arch)
        point.click()
    clear_search(browser)
    assert "convnextv2_large" in browser.find_element("id", "compare").text
    screenshot(browser, "webapp-h100-page.png")
    screenshot(browser, "webapp-h100.png", height_px=1120)  # the chart and the comparison: docs/figures/webapp.png


def test_database_that_breaks_under_the_server(browser, database: Path, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    db = tmp_path / "breaks.sqlite"
    shutil.copy(database, db)
    server = make_server(db, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        open_page(browser, server.url)
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        conn.close()
        # An open page learns it at its next status poll (every 15 s; called here at once): a banner over the view.
        browser.execute_script("window.wattscope.poll()")
        stale = browser.find_element("id", "stale")
        WebDriverWait(browser, 10).until(lambda d: stale.is_displayed())
        assert "can no longer be read" in stale.text and "schema version 99" in stale.text
        # The download says why it cannot run, and the page stays.
        browser.execute_script("document.getElementById('stale').hidden = true")
        browser.find_element("id", "download").click()
        WebDriverWait(browser, 10).until(lambda d: stale.is_displayed())
        assert stale.text.startswith("The table could not be downloaded: ") and "schema version 99" in stale.text
        assert browser.current_url == server.url
        # A page loaded now shows the error panel instead of the app.
        open_page(browser, server.url, state="error")
        panel = browser.find_element("id", "error")
        assert panel.is_displayed() and "schema version 99" in panel.text
        assert not browser.find_element("id", "app").is_displayed()
        # The one console error is the failed request for the data, which the panel explains.
        errors = console_errors(browser)
        assert len(errors) == 1 and "503" in errors[0]["message"], errors
        screenshot(browser, "webapp-error.png")
    finally:
        server.shutdown()
        server.server_close()
