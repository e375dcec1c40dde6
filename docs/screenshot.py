"""Make docs/dashboard.png: the dashboard of a real server (packaged MiniLM, the demo tasks) in headless Chromium.

    python docs/screenshot.py [--out docs/dashboard.png]

Starts `deltaserve serve` on a fresh store (which installs the demo tasks), sends a little traffic
so the live figures move, runs the try-it boxes of an SST-2 task and the NER task, and saves a
full-page screenshot. Needs Debian's chromium and chromium-driver and Selenium.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a gripping, funny film", "a dull, tedious mess", "the cast is terrific", "I want my two hours back"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as store:
        server = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port), "--store", store,
                                   "--log-level", "warning"], cwd=REPO)
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if client.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start")
                    time.sleep(0.5)
                tasks = [t["name"] for t in client.get("/tasks").json()["tasks"]]
                options = webdriver.ChromeOptions()
                options.binary_location = shutil.which("chromium") or "chromium"
                for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                             "--hide-scrollbars"):
                    options.add_argument(flag)
                driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(
                    executable_path=shutil.which("chromedriver") or "chromedriver"))
                try:
                    driver.get(url + "/")
                    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, "body[data-loaded=true]"))

                    stop = threading.Event()

                    def traffic(worker: int) -> None:
                        names = [t for t in tasks if t != "conll-ner"]
                        i = worker
                        while not stop.is_set():
                            client.post(f"/tasks/{names[i % len(names)]}/predict",
                                        json={"inputs": TEXTS[i % len(TEXTS)]})
                            i += 1

                    # Traffic from 8 clients through the screenshot, so the rates and batch sizes are real.
                    workers = [threading.Thread(target=traffic, args=(w,)) for w in range(8)]
                    for worker in workers:
                        worker.start()
                    time.sleep(9)
                    for card in driver.find_elements(By.CSS_SELECTOR, ".try"):
                        if card.get_attribute("data-task") in ("sst2-mask", "conll-ner"):
                            card.find_element(By.CSS_SELECTOR, "button.predict").click()
                            WebDriverWait(driver, 30).until(lambda _d, c=card: c.find_elements(
                                By.CSS_SELECTOR, ".result .muted"))
                    # A moment when the last poll saw traffic (a shared, loaded machine can stall for seconds).
                    WebDriverWait(driver, 60, poll_frequency=0.2).until(
                        lambda d: d.find_element(By.ID, "live-rps").text not in ("–", "0.0"))
                    # The whole page in one image: a viewport as tall as the page.
                    height = driver.execute_script("return document.documentElement.scrollHeight")
                    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                           {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
                    driver.execute_script("window.scrollTo(0, 0)")
                    time.sleep(0.5)
                    driver.save_screenshot(str(args.out))
                    stop.set()
                    for worker in workers:
                        worker.join()
                    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
                finally:
                    driver.quit()
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    main()
