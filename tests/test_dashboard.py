"""The dashboard at `/` in a real Chromium (Selenium driving Debian's chromium-driver) against a real
uvicorn server on a tiny backbone with a tenants file: it asks for a key, then shows that tenant's tasks
only; its memory figures are /memory's, a try-it prediction shows what the API answers, an upload through
its form lands in the table, and with the admin token it shows everything and the live figures.

One browser session for the whole walk-through: starting Chromium is the slow part.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import make_tiny_backbone
from delta_builders import NER_LABELS, build_delta
from http_helpers import ADMIN, live_server, settings

from server.app import create_app
from server.tenants import key_hash

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")

ACME = {"Authorization": "Bearer acme-key"}
MEMORY_KEYS = ("backbone_bytes", "num_tasks", "delta_bytes_total", "serving_bytes", "finetuned_copies_bytes",
               "saved_bytes", "saved_fraction", "resident_delta_bytes")


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A real uvicorn server in a thread with two tenants: acme owns a sentiment task and an NER task,
    beta one task of its own."""
    backbone = make_tiny_backbone(tokenizer)
    folder = tmp_path_factory.mktemp("dashboard")
    tenants = folder / "tenants.toml"
    tenants.write_text(f'[tenants.acme]\nkeys = ["sha256:{key_hash("acme-key")}"]\n\n'
                       f'[tenants.beta]\nkeys = ["sha256:{key_hash("beta-key")}"]\n')
    app = create_app(settings(folder / "store", tenants_file=tenants), backbone=backbone)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30, headers=ADMIN) as client:
        for name, data in {"sentiment": build_delta(backbone, parts=("lora", "keep")),
                           "ner": build_delta(backbone, task_type="token-classification", labels=NER_LABELS,
                                              method="mask", parts=("keep",), seed=3)}.items():
            assert client.put(f"/tasks/{name}", content=data, headers=ACME).status_code == 201
        beta = build_delta(backbone, seed=9)
        assert client.put("/tasks/beta-only", content=beta, headers={"Authorization": "Bearer beta-key"}).is_success
        upload = folder / "uploaded.safetensors"
        upload.write_bytes(build_delta(backbone, labels=("no", "maybe", "yes"), method="lora", seed=7))
        yield {"url": url, "client": client, "upload": upload, "folder": folder, "backbone": backbone}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def metric_values(text: str) -> dict[str, float]:
    """Unlabelled samples of the Prometheus text, by name."""
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            values[name] = float(value)
    return values


def severe(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for(driver: Any, css: str, timeout: float = 20) -> Any:
    return WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.CSS_SELECTOR, css))


def use_key(driver: Any, key: str) -> None:
    """Type `key` in the header's key field and use it; the page reloads its data with it."""
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.ID, "key-submit").click()


def check_memory(driver: Any, memory: dict[str, Any]) -> None:
    for key in MEMORY_KEYS:
        dd = driver.find_element(By.ID, f"mem-{key}")
        shown = dd.get_attribute("data-value")
        if key == "saved_fraction":
            assert float(shown) == memory[key]
            assert dd.text == f"{memory[key] * 100:.1f} %"
        else:
            assert int(shown) == memory[key], key
            assert dd.text.split(" B")[0].replace(",", "") == str(memory[key]), (key, dd.text)
    # The chart's solid curves have one point per task plus the empty server.
    for series in ("serving", "copies"):
        path = driver.find_element(By.CSS_SELECTOR, f"#memory-chart path[data-series={series}]")
        assert path.get_attribute("d").count("L") == memory["num_tasks"]


def test_dashboard_in_chromium(live, browser):
    client: httpx.Client = live["client"]
    browser.get(live["url"] + "/")
    # The server asks for a key: the page says so, then shows the tenant's tasks once its key is typed in.
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "key-status").text.startswith("401"))
    assert browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr") == []
    use_key(browser, "acme-key")
    wait_for(browser, "body[data-loaded=true]")
    assert browser.find_element(By.ID, "key-status").text == ""
    assert all(" 401 " in message for message in severe(browser))  # Chromium logs the refused requests

    # The tasks table is the tenant's /tasks: beta's task is not there.
    tasks = client.get("/tasks", headers=ACME).json()["tasks"]
    assert [t["name"] for t in tasks] == ["ner", "sentiment"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")
    assert [r.get_attribute("data-task") for r in rows] == [t["name"] for t in tasks]
    for row, task in zip(rows, tasks, strict=True):
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        assert cells == [task["name"], task["method"], task["task_type"], str(task["version"]),
                         f"{task['delta_bytes']:,}", ", ".join(task["labels"])]

    check_memory(browser, client.get("/memory", headers=ACME).json())

    # Try it: sequence classification shows the API's label and its scores as bars.
    card = browser.find_element(By.CSS_SELECTOR, ".try[data-task=sentiment]")
    text = "a gripping, funny film"
    area = card.find_element(By.CSS_SELECTOR, "textarea")
    area.clear()
    area.send_keys(text)
    card.find_element(By.CSS_SELECTOR, "button.predict").click()
    verdict = wait_for(card, ".verdict")
    expected = client.post("/tasks/sentiment/predict", json={"inputs": text}).json()["predictions"][0]
    assert verdict.text == expected["label"]
    bars = {b.get_attribute("data-label"): float(b.get_attribute("data-score"))
            for b in card.find_elements(By.CSS_SELECTOR, ".bar")}
    assert bars == pytest.approx(expected["scores"], abs=1e-9)
    assert card.find_element(By.CSS_SELECTOR, ".bar.top").get_attribute("data-label") == expected["label"]

    # Token classification: the API's entities, highlighted in the text.
    card = browser.find_element(By.CSS_SELECTOR, ".try[data-task=ner]")
    card.find_element(By.CSS_SELECTOR, "button.predict").click()
    marked = wait_for(card, ".result .marked")
    text = card.find_element(By.CSS_SELECTOR, "textarea").get_attribute("value")
    entities = client.post("/tasks/ner/predict", json={"inputs": text}).json()["predictions"][0]["entities"]
    assert entities, "the NER task should find something in the example text"
    shown = browser.execute_script(
        "const p = arguments[0].cloneNode(true); const marks = [...p.querySelectorAll('mark')];"
        "p.querySelectorAll('sup').forEach((s) => s.remove());"
        "return [marks.map((m) => [m.dataset.label, m.textContent]), p.textContent];", marked)
    assert shown[0] == [[e["label"], text[e["start"]:e["end"]]] for e in entities]
    assert shown[1] == text  # the whole text, nothing lost around the marks

    # Upload through the form, with the tenant's key: the new task is acme's, appears in the table, and the
    # memory card follows.
    browser.find_element(By.ID, "upload-name").send_keys("uploaded")
    browser.find_element(By.ID, "upload-file").send_keys(str(live["upload"]))
    browser.find_element(By.ID, "upload-submit").click()
    wait_for(browser, "#tasks tbody tr[data-task=uploaded]")
    assert "uploaded: version 1 stored" in browser.find_element(By.ID, "upload-result").text
    info = client.get("/tasks/uploaded").json()
    assert info["labels"] == ["no", "maybe", "yes"] and info["version"] == 1 and info["owner"] == "acme"
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "mem-num_tasks").text == "3")
    check_memory(browser, client.get("/memory", headers=ACME).json())
    wait_for(browser, ".try[data-task=uploaded]")

    # /metrics is the operator's: with the admin token the page shows every tenant's tasks and the live figures.
    use_key(browser, "s3cret")
    wait_for(browser, "#tasks tbody tr[data-task=beta-only]")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "mem-num_tasks").text == "4")
    # What Chromium logged until now: the tenant's polls of /metrics, refused (one may end after the switch).
    assert all(" 401 " in message and "metrics" in message for message in severe(browser))

    # Live figures: two polls of /metrics give rates; the predictions above went through the engine.
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "live-rps").text != "–")
    float(browser.find_element(By.ID, "live-rps").text)
    assert float(browser.find_element(By.ID, "live-batch-requests").text) >= 1
    # Cumulative figures equal /metrics once a poll has seen the last prediction (none comes after it).
    metrics = metric_values(client.get("/metrics").text)
    hits, misses = int(metrics["deltaserve_cache_hits_total"]), int(metrics["deltaserve_cache_misses_total"])
    assert misses >= 2 and hits >= 1  # each task's delta prepared once, then reused
    padding = metrics["deltaserve_batch_tokens_total"] / metrics["deltaserve_batch_padded_tokens_total"]
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "live-cache").text == f"{hits:,} / {misses:,}")
    assert browser.find_element(By.ID, "live-padding").text == f"{padding * 100:.1f} %"

    screenshot = live["folder"] / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    assert severe(browser) == []

    # A wrong token: the server's 401 detail shows under the form, and nothing is stored.
    browser.find_element(By.ID, "upload-name").clear()
    browser.find_element(By.ID, "upload-name").send_keys("refused")
    browser.find_element(By.ID, "upload-file").send_keys(str(live["upload"]))
    use_key(browser, "wrong")
    browser.find_element(By.ID, "upload-submit").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "upload-result").text.startswith("401"))
    assert "Bearer" in browser.find_element(By.ID, "upload-result").text
    assert client.get("/tasks/refused").status_code == 404


def test_static_files_only_from_the_folder(live):
    client: httpx.Client = live["client"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/static/dashboard.js").headers["content-type"].split(";")[0] in (
        "text/javascript", "application/javascript")
    for path in ("/static/..%2Fapp.py", "/static/missing.js", "/static/%2e%2e"):
        response = client.get(path)
        assert response.status_code == 404 and "detail" in response.json()
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_embedding_try_it_compares_two_texts(live, browser):
    """An embedding task's card: two texts in, their cosine similarity and the vector's size out."""
    client: httpx.Client = live["client"]
    data = build_delta(live["backbone"], parts=("lora",), task_type="embedding", projection=24, seed=5)
    assert client.put("/tasks/similar", content=data, headers=ADMIN).status_code == 201
    browser.get(live["url"] + "/")
    use_key(browser, "s3cret")  # the operator's: it sees the operator's task
    card = wait_for(browser, ".try[data-task=similar]")
    severe(browser)  # the page's first requests went out with the last test's wrong key: 401s, logged
    assert card.find_element(By.CSS_SELECTOR, "button.predict").text == "Compare"
    first, second = "A man is playing a guitar.", "Someone plays an instrument."
    card.find_element(By.CSS_SELECTOR, "textarea").clear()
    card.find_element(By.CSS_SELECTOR, "textarea").send_keys(first)
    card.find_element(By.CSS_SELECTOR, "input.text-b").clear()
    card.find_element(By.CSS_SELECTOR, "input.text-b").send_keys(second)
    card.find_element(By.CSS_SELECTOR, "button.predict").click()
    shown = wait_for(card, ".cosine")
    vectors = [p["embedding"] for p in client.post("/tasks/similar/predict",
                                                   json={"inputs": [first, second]}).json()["predictions"]]
    dot = sum(a * b for a, b in zip(*vectors, strict=True))
    norms = [sum(x * x for x in v) ** 0.5 for v in vectors]
    assert float(shown.get_attribute("data-value")) == pytest.approx(dot / (norms[0] * norms[1]), abs=1e-9)
    assert card.find_element(By.CSS_SELECTOR, ".size").get_attribute("data-size") == "24"
    assert severe(browser) == []
