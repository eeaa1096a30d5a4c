"""The dashboard in a real browser: headless Chromium loads the pages from a running `consa serve`,
its JavaScript fetches the v1 API with the key, and we read the DOM it built and the pixels it drew.
Where a page must be used, not only looked at (the submit form, ticking runs to compare, deleting),
`Browser` drives Chromium over the DevTools protocol: real mouse clicks and typed text."""

import contextlib
import datetime as dt
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from consa.cli.client import ApiError, Client
from service_fixtures import ROOT, free_port
from test_client import SMALL, shared_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium: apt-get install -y chromium"), pytest.mark.slow]  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it


@pytest.fixture(scope="module")
def dash(request, tmp_path_factory, tiny_model_dir, text_dir):
    """The shared server's URL for the dashboard. Until the app includes the dashboard router itself,
    a second API process on the same database serves it with the router added."""
    srv = shared_server(request.config, tmp_path_factory, tiny_model_dir, text_dir)
    if httpx.get(srv.url + "/dashboard").status_code == 200:
        yield srv, srv.url
        return
    port = free_port()
    code = ("import uvicorn; from service.main import create_app; from service.dashboard import router; "
            f"app = create_app(); app.include_router(router); uvicorn.run(app, host='127.0.0.1', port={port})")
    proc = subprocess.Popen([sys.executable, "-c", code], env=srv.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/dashboard").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "dashboard server did not start"
                time.sleep(0.3)
        yield srv, url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def chromium(url: str, tmp_path: Path, *, screenshot: Path | None = None) -> str:
    """Load `url` headless, let its scripts and fetches run, return the DOM (or write a screenshot)."""
    profile = tmp_path / f"profile-{time.monotonic_ns()}"  # a fresh localStorage every time
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=8000",
            "--window-size=1280,1400", "--hide-scrollbars"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def rows(dom: str) -> dict[str, str]:
    return dict(re.findall(r'<tr data-job-id="(job_\w+)" data-status="(\w+)"', dom))


def pixels_near(image, rgb, tol=40) -> int:
    """How many pixels of `image` lie within `tol` (per channel) of the colour `rgb`."""
    return sum(n for n, c in image.getcolors(1 << 24) if all(abs(a - b) <= tol for a, b in zip(c, rgb)))


@pytest.fixture(scope="module")
def jobs(dash):
    srv, _ = dash
    alice = Client(srv.url, srv.alice)
    body = {"model": srv.model, "dataset": srv.data} | SMALL
    # seq_len 160: the evaluation scores 4-key retrieval documents, which need that much room.
    done = alice.submit(body | {"evaluate": True, "seq_len": 160, "metadata": {"run": "dashboard"}})
    long = alice.submit(body | {"steps": 5000})
    alice.cancel(long["id"])
    # A second evaluated run to compare with the first (whole layers this time).
    layer = alice.submit(body | {"evaluate": True, "seq_len": 160, "granularity": "layer"})
    broken = Path(srv.model).parent / "not-a-model-dashboard"  # inside the allowed model root, no model
    broken.mkdir(exist_ok=True)
    failed = alice.submit(body | {"model": str(broken)})
    doomed = [alice.submit(body | {"steps": 1, "metadata": {"run": "to delete"}}) for _ in range(2)]
    ids = {"succeeded": done, "cancelled": long, "layer": layer, "failed": failed, "doomed": doomed[0],
           "doomed_too": doomed[1]}
    return {name: alice.wait(job["id"], poll_s=0.2) for name, job in ids.items()}


class Browser:
    """Headless Chromium over the Chrome DevTools protocol (a websocket; `websockets` comes with
    uvicorn[standard], in the service extra). Clicks are mouse events at the element's centre and
    text is typed with Input.insertText, so the page sees what a person's input would produce."""

    def __init__(self, tmp_path: Path):
        from websockets.sync.client import connect

        profile = tmp_path / f"cdp-{time.monotonic_ns()}"  # a fresh localStorage every time
        self.proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                      "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                      "--window-size=1280,1400", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # Chromium writes the port it chose into the profile.
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and self.proc.poll() is None, "Chromium did not start its DevTools"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        self.closing = contextlib.ExitStack()
        self.ws = self.closing.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None))
        self.last_id, self.accept_dialogs, self.dialogs = 0, True, []
        self.call("Page.enable")  # for javascriptDialogOpening: confirm() is answered in call()

    def call(self, method: str, **params):
        self.last_id += 1
        mine = self.last_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("method") == "Page.javascriptDialogOpening":  # a confirm() blocks the page until answered
                self.dialogs.append(msg["params"]["message"])
                self.last_id += 1
                self.ws.send(json.dumps({"id": self.last_id, "method": "Page.handleJavaScriptDialog",
                                         "params": {"accept": self.accept_dialogs}}))
            elif msg.get("id") == mine:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"still false after {timeout}s: {expression}"
            time.sleep(0.2)
        return value

    def goto(self, url: str) -> None:
        self.js("window.oldPage = true")  # gone once the new document has replaced this one
        if "loaderId" not in self.call("Page.navigate", url=url):
            self.call("Page.reload")  # only the #fragment changed: the page must load again to read it
        self.wait("!window.oldPage && document.readyState === 'complete'")

    def click(self, selector: str) -> None:
        x, y = self.wait(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            if (!e) return null; e.scrollIntoView({{block: "center"}});
            const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""", 10)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, selector: str, text) -> None:
        self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.value = ''; e.focus(); }})()")
        self.call("Input.insertText", text=str(text))

    def choose(self, selector: str, value: str) -> None:
        self.js(f"""(() => {{ const e = document.querySelector({json.dumps(selector)}); e.value = {json.dumps(value)};
            e.dispatchEvent(new Event("change", {{bubbles: true}})); }})()""")

    def text(self, selector: str) -> str | None:
        return self.js(f"document.querySelector({json.dumps(selector)})?.textContent ?? null")

    def close(self) -> None:
        self.closing.close()
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path)
    yield b
    b.close()


def row_sel(job_id: str, inner: str = "") -> str:
    return f'#jobs tr[data-job-id="{job_id}"] {inner}'.strip()


def location_is(browser, path: str) -> bool:
    return browser.js("location.pathname") == path


def open_jobs_page(browser, url: str, key: str) -> None:
    browser.goto(f"{url}/dashboard#key={key}")
    browser.wait("document.body?.dataset.loaded === 'jobs'")


def test_jobs_table_shows_the_keys_jobs_with_status_and_progress(dash, jobs, tmp_path):
    srv, url = dash
    dom = chromium(f"{url}/dashboard#key={srv.alice}", tmp_path)
    shown = rows(dom)
    assert shown[jobs["succeeded"]["id"]] == "succeeded" and shown[jobs["cancelled"]["id"]] == "cancelled"
    row = re.search(rf'<tr data-job-id="{jobs["succeeded"]["id"]}".*?</tr>', dom).group(0)
    # The bar shows the job's phase: a finished job ends in its export's last stage.
    assert 'data-phase="export"' in row and "export 2/2" in row and 'class="status status-succeeded"' in row
    assert f'href="/dashboard/jobs/{jobs["succeeded"]["id"]}"' in row

    # Another key sees none of alice's jobs; no key gets a prompt instead of a table.
    assert not set(rows(chromium(f"{url}/dashboard#key={srv.bob}", tmp_path))) & set(shown)
    assert "Enter an API key" in chromium(f"{url}/dashboard", tmp_path)
    assert "API key was refused" in chromium(f"{url}/dashboard#key=consa_wrong", tmp_path)


def test_job_page_draws_the_curve_heatmap_and_artifacts(dash, jobs, tmp_path):
    from PIL import Image

    srv, url = dash
    job = jobs["succeeded"]
    page = f"{url}/dashboard/jobs/{job['id']}#key={srv.alice}"
    dom = chromium(page, tmp_path)
    assert 'data-loaded="final"' in dom, "the page did not finish loading the job"
    # Each phase the job went through, in order, all done: search steps, allocations scored, export stages.
    phases = re.findall(r'<li class="phase phase-(\w+)" data-phase="(\w+)" data-state="\w+">(\w+) (\d+)/(\d+)</li>', dom)
    assert [p[1] for p in phases] == ["search", "evaluation", "export"], phases
    assert all(state == "done" and done == total for state, _, _, done, total in phases), phases
    assert phases[0][3:] == (str(SMALL["steps"]),) * 2 and phases[2][3:] == ("2", "2")
    # One point of the loss curve per search step (the later phases' records repeat the last step).
    loss_path = re.search(r'<path d="([^"]+)" class="line line-loss"', dom).group(1)
    assert loss_path.count("L") + 1 == SMALL["steps"]
    assert re.search(r'class="line line-sparsity"', dom)
    artifacts = {a["name"]: a for a in Client(srv.url, srv.alice).artifacts(job["id"])}
    for name in artifacts:
        assert f'data-artifact="{name}"' in dom
    assert dom.count(">Download</button>") == len(artifacts)
    assert re.search(r'<img id="heatmap-img" alt="[^"]*" src="blob:', dom), "heatmap not fetched"

    # The pixels: the green status badge, the magenta loss line, and the heatmap's own colours.
    shot = tmp_path / "job.png"
    chromium(page, tmp_path, screenshot=shot)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1400)
    assert pixels_near(image, (0x2E, 0x7D, 0x32), tol=8) > 300, "no succeeded badge"
    assert pixels_near(image, (0xD8, 0x1B, 0x60), tol=30) > 150, "no loss curve"
    heatmap = Image.open(io.BytesIO(Client(srv.url, srv.alice)._request(
        "GET", f"/v1/jobs/{job['id']}/artifacts/heatmap.png").read())).convert("RGB")
    colours = sorted(heatmap.getcolors(1 << 24), reverse=True)
    # Its most common colours other than white/background must show up on screen in quantity.
    vivid = [c for n, c in colours if max(c) - min(c) > 60][:2]
    assert vivid, "the heatmap artifact has no coloured cells"
    for colour in vivid:
        # the page scales the PNG down, so a colour that fills a few cells covers a few hundred pixels
        assert pixels_near(image, colour, tol=12) > 150, f"heatmap colour {colour} not on the page"


def test_job_page_renders_the_evaluation_table(dash, jobs, tmp_path):
    """The worker's evaluation.md (learned vs full vs the baseline rules) becomes an HTML table."""
    srv, url = dash
    job_id = jobs["succeeded"]["id"]
    dom = chromium(f"{url}/dashboard/jobs/{job_id}#key={srv.alice}", tmp_path)
    evaluation = re.search(r'<div id="evaluation".*?</table>', dom, re.S).group(0)
    header = re.findall(r"<th>([^<]*)</th>", evaluation)
    assert header[:2] == ["allocation", "method"] and "loss" in header
    first_cells = re.findall(r"<tr><td>([^<]*)</td>", evaluation)
    assert {"full", "learned"} <= set(first_cells) and len(first_cells) >= 4  # + at least two baselines


def test_pages_and_assets_are_served_without_a_key(dash):
    _, url = dash
    assert httpx.get(url + "/dashboard/static/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(url + "/dashboard/static/../main.py").status_code == 404
    assert httpx.get(url + "/dashboard/static/index.html").status_code == 404  # only listed assets
    assert httpx.get(url + "/", follow_redirects=False).headers["location"] == "/dashboard"
    compare = httpx.get(url + "/dashboard/compare?jobs=a,b")
    assert compare.status_code == 200 and 'data-page="compare"' in compare.text


def test_a_job_submitted_from_the_form_runs_to_the_end(dash, browser):
    srv, url = dash
    doc = httpx.get(url + "/openapi.json").json()
    schema = doc["components"]["schemas"]["JobCreate"]
    open_jobs_page(browser, url, srv.alice)
    browser.wait("document.getElementById('submit-form').dataset.ready === 'true'")
    browser.click("#new-job summary")

    # Every field of the API's job body, required ones first, with the schema's defaults, bounds, help.
    fields = browser.js("[...document.querySelectorAll('#submit-fields .field')].map((f) => f.dataset.field)")
    assert sorted(fields) == sorted(schema["properties"]) and fields[:2] == ["model", "sparsity"]
    steps = schema["properties"]["steps"]
    shown = browser.js("""(() => { const i = document.getElementById('field-steps');
        return [i.value, i.min, i.max, i.closest('.field').querySelector('.help').textContent]; })()""")
    assert shown[:3] == [str(steps["default"]), str(int(steps["minimum"])), str(steps["maximum"])], shown
    assert steps["description"] in shown[3] and f"default {steps['default']}" in shown[3]
    assert browser.js("[...document.getElementById('field-granularity').options].map((o) => o.value)") == \
        schema["properties"]["granularity"]["enum"]
    assert browser.js("document.getElementById('field-evaluate').checked") is False  # its default

    # The API's problem (a model outside the server's model roots) shows beside the form and its field.
    browser.type("#field-model", "/opt/elsewhere/model")
    browser.type("#field-sparsity", "0.5")
    browser.click("#submit-job")
    browser.wait("!document.getElementById('submit-error').hidden")
    assert "model_path_not_allowed" in browser.text("#submit-error")
    assert "outside the server's model roots" in browser.text('[data-field="model"] .field-error')

    browser.type("#field-model", srv.model)
    browser.type("#field-dataset", srv.data)
    for name in ("window", "steps", "lr"):
        browser.type(f"#field-{name}", SMALL[name])
    browser.type("#field-seq_len", 160)  # room for the evaluation's retrieval documents
    browser.click("#field-evaluate")
    browser.type("#field-metadata", "run=form")
    browser.click("#submit-job")
    job_id = browser.wait("document.getElementById('submitted-job')?.textContent")
    assert browser.js("document.getElementById('submit-error').hidden")

    # The table follows it to the end; the achieved share comes from its manifest.
    browser.wait(f"document.querySelector('{row_sel(job_id)}')?.dataset.status === 'succeeded'", 240)
    achieved = browser.wait(f"document.querySelector('{row_sel(job_id, '.achieved')}').dataset.value")
    job = Client(srv.url, srv.alice).get(job_id)
    assert job["status"] == "succeeded" and job["metadata"] == {"run": "form"}
    config = job["config"]
    assert (config["window"], config["steps"], config["lr"], config["seq_len"], config["evaluate"]) == \
        (SMALL["window"], SMALL["steps"], SMALL["lr"], 160, True)
    assert config["granularity"] == "kv_head" and config["sparsity"] == 0.5  # the default and the typed value
    manifest = json.loads(Client(srv.url, srv.alice)._request("GET", f"/v1/jobs/{job_id}/artifacts/manifest.json").read())
    assert float(achieved) == manifest["sparsity_achieved"] == 0.5
    assert browser.text(row_sel(job_id, ".achieved")) == "0.50"


def test_runs_table_shows_granularity_target_achieved_sparsity_and_elapsed(dash, jobs, browser):
    srv, url = dash
    open_jobs_page(browser, url, srv.alice)
    for name, granularity in (("succeeded", "kv_head"), ("layer", "layer")):
        job = jobs[name]
        assert browser.text(row_sel(job["id"], ".granularity")) == granularity
        assert browser.text(row_sel(job["id"], ".target")) == "0.50"
        # Achieved: the allocation's share of SWA units (0.5), not the gates' expected sparsity ŝ of the
        # last step, which this short search leaves far below the target (the old column showed it).
        browser.wait(f"document.querySelector('{row_sel(job['id'], '.achieved')}').dataset.value")  # fetched
        assert browser.text(row_sel(job["id"], ".achieved")) == "0.50"
        assert abs(job["progress"]["sparsity"] - 0.5) > 0.1
        elapsed = float(browser.js(f"document.querySelector('{row_sel(job['id'], '.elapsed')}').dataset.s"))
        started, finished = (dt.datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
        assert abs(elapsed - (finished - started).total_seconds()) < 0.01
        assert browser.text(row_sel(job["id"], ".eta")) == "–"  # it has ended
    # A cancelled search has no allocation: nothing achieved.
    assert browser.text(row_sel(jobs["cancelled"]["id"], ".achieved")) == "–"


def test_a_running_job_shows_its_eta(dash, browser):
    srv, url = dash
    alice = Client(srv.url, srv.alice)
    job = alice.submit({"model": srv.model, "dataset": srv.data} | SMALL | {"steps": 5000})
    try:
        deadline = time.monotonic() + 120
        while ((job := alice.get(job["id"]))["progress"] or {}).get("step", 0) < 20:
            assert time.monotonic() < deadline, "the job took no 20 steps"
            time.sleep(0.2)
        open_jobs_page(browser, url, srv.alice)
        eta = float(browser.wait(f"document.querySelector('{row_sel(job['id'], '.eta')}')?.dataset.s"))
        p = alice.get(job["id"])["progress"]
        assert p["start_step"] == 0  # a first attempt; a resumed one's pace counts from its start_step
        expected = p["elapsed_s"] / (p["step"] - p["start_step"]) * (p["total_steps"] - p["step"])
        assert expected / 3 < eta < expected * 3, (eta, expected)  # the same pace, read moments apart
        assert re.fullmatch(r"\d+ (s|min \d+ s|h \d+ min)", browser.text(row_sel(job["id"], ".eta")))
        assert browser.js(f"document.querySelector('{row_sel(job['id'], '.delete')}')") is None  # not ended: no delete
    finally:
        alice.cancel(job["id"])
        alice.wait(job["id"], poll_s=0.2)


def test_a_failed_jobs_error_is_shown_in_the_list(dash, jobs, browser):
    srv, url = dash
    job = jobs["failed"]
    assert job["status"] == "failed" and job["error"]["message"]
    open_jobs_page(browser, url, srv.alice)
    assert browser.js(f"document.querySelector('{row_sel(job['id'])}').dataset.status") == "failed"
    error = f'#jobs tr[data-error-of="{job["id"]}"]'
    assert browser.text(error) == f"{job['error']['code']}: {job['error']['message']}"
    # on the row right under the job's
    assert browser.js(f"document.querySelector('{row_sel(job['id'])}').nextElementSibling === document.querySelector('{error}')")
    assert browser.js(f"document.querySelector('#jobs tr[data-error-of=\"{jobs['succeeded']['id']}\"]')") is None


def test_compare_view_shows_two_runs_side_by_side(dash, jobs, browser):
    srv, url = dash
    runs = [jobs["succeeded"]["id"], jobs["layer"]["id"]]
    open_jobs_page(browser, url, srv.alice)
    assert browser.js("document.getElementById('compare').disabled")
    for job_id in runs:
        browser.click(row_sel(job_id, "input.pick"))
    assert not browser.js("document.getElementById('compare').disabled")
    browser.js("window.oldPage = true")
    browser.click("#compare")
    browser.wait("!window.oldPage && document.body?.dataset.loaded === 'final'")
    assert browser.js("document.body.dataset.page") == "compare"
    assert browser.js("new URLSearchParams(location.search).get('jobs')") == ",".join(runs)

    assert browser.js("[...document.querySelectorAll('#runs tbody tr')].map((r) => r.dataset.jobId)") == runs
    assert browser.js("[...document.querySelectorAll('#runs .achieved')].map((c) => c.textContent)") == ["0.50", "0.50"]
    # One loss curve per run on one chart, a point per search step, told apart by colour.
    paths = browser.js("""[...document.querySelectorAll('#chart path.line-loss')]
        .map((p) => [p.dataset.series, p.dataset.label, p.getAttribute('d').split('L').length, getComputedStyle(p).stroke])""")
    assert [p[:3] for p in paths] == [["0", runs[0], SMALL["steps"]], ["1", runs[1], SMALL["steps"]]]
    assert paths[0][3] != paths[1][3]
    # Both heatmaps, fetched and decoded; both evaluation tables.
    assert browser.js("[...document.querySelectorAll('#heatmaps img.heatmap')]"
                      ".filter((i) => i.src.startsWith('blob:') && i.naturalWidth > 0).length") == 2
    tables = browser.js("""[...document.querySelectorAll('#evaluations .run-evaluation')].map((d) =>
        [d.dataset.jobId, [...d.querySelectorAll('tbody tr td:first-child')].map((c) => c.textContent)])""")
    assert [t[0] for t in tables] == runs and all({"full", "learned"} <= set(t[1]) for t in tables), tables

    # The scatter: every method of every run's evaluation that has a loss and a retrieval score.
    alice = Client(srv.url, srv.alice)
    expected = set()
    for job_id in runs:
        for record in json.loads(alice._request("GET", f"/v1/jobs/{job_id}/artifacts/evaluation.json").read()):
            if isinstance(record.get("retrieval_acc"), (int, float)) and math.isfinite(record["loss"]):
                expected.add((job_id, record["name"]))
    dots = browser.js("[...document.querySelectorAll('#scatter circle.dot')].map((c) => [c.dataset.run, c.dataset.method])")
    assert len(expected) >= 8 and len(dots) == len(expected) and {tuple(d) for d in dots} == expected


def test_delete_asks_first_then_removes_the_row(dash, jobs, browser):
    srv, url = dash
    job_id = jobs["doomed"]["id"]
    alice = Client(srv.url, srv.alice)
    open_jobs_page(browser, url, srv.alice)
    browser.accept_dialogs = False
    browser.click(row_sel(job_id, "button.delete"))
    browser.js("1")  # answered only once the confirm() it opened has been
    assert job_id in browser.dialogs[-1]
    assert browser.js(f"!!document.querySelector('{row_sel(job_id)}')") and alice.get(job_id)["id"] == job_id

    browser.accept_dialogs = True
    browser.click(row_sel(job_id, "button.delete"))
    browser.wait(f"!document.querySelector('{row_sel(job_id)}')")
    with pytest.raises(ApiError) as e:
        alice.get(job_id)
    assert e.value.status == 404
    open_jobs_page(browser, url, srv.alice)  # and after a reload
    assert not browser.js(f"!!document.querySelector('{row_sel(job_id)}')")
    assert browser.js(f"!!document.querySelector('{row_sel(jobs['succeeded']['id'])}')")

    # The job page's own Delete button: confirmed, it deletes and goes back to the list.
    other = jobs["doomed_too"]["id"]
    browser.goto(f"{url}/dashboard/jobs/{other}#key={srv.alice}")
    browser.wait("document.body?.dataset.loaded === 'final'")
    browser.js("window.oldPage = true")
    browser.click("#delete")
    browser.wait("!window.oldPage && document.body?.dataset.loaded === 'jobs'")
    assert other in browser.dialogs[-1] and location_is(browser, "/dashboard")
    with pytest.raises(ApiError):
        alice.get(other)


def test_a_retried_jobs_attempts_are_separate_series(dash, browser):
    """The worker killed for real mid-search: `consa serve` starts a new one, which claims the job again
    (a second "running" status event) and searches on. The chart draws each attempt as its own series."""
    from service_fixtures import the_worker, wait_until

    srv, url = dash
    alice = Client(srv.url, srv.alice)
    job = alice.submit({"model": srv.model, "dataset": srv.data} | SMALL | {"steps": 5000})
    step = lambda: (alice.get(job["id"])["progress"] or {}).get("step", 0)

    def progress_per_claim() -> list[int]:  # progress events after each "running" status event
        counts = []
        for e in alice.iter_events(job["id"]):
            if (e.get("data") or {}).get("status") == "running":
                counts.append(0)
            elif e["type"] == "progress" and counts:
                counts[-1] += 1
        return counts

    try:
        wait_until(lambda: step() >= 10, 120, "the first attempt's 10 steps")
        os.kill(the_worker(srv), signal.SIGKILL)
        wait_until(lambda: len(c := progress_per_claim()) >= 2 and c[1] >= 5, 180,
                   "a new worker's claim of the job, and 5 steps of its attempt")
    finally:
        alice.cancel(job["id"])
    alice.wait(job["id"], poll_s=0.2)
    counts = progress_per_claim()
    assert len(counts) == 2 and counts[0] >= 10, counts

    browser.goto(f"{url}/dashboard/jobs/{job['id']}#key={srv.alice}")
    browser.wait("document.body?.dataset.loaded === 'final'")
    paths = browser.js("""[...document.querySelectorAll('#chart path.line-loss')]
        .map((p) => [p.dataset.series, p.dataset.label, p.getAttribute('d').split('L').length])""")
    assert paths == [["0", "attempt 1", counts[0]], ["1", "attempt 2", counts[1]]]
    assert browser.js("[...document.querySelectorAll('#chart .legend .series')].map((k) => k.textContent)") == \
        ["attempt 1", "attempt 2"]
    dashes = browser.js("[...document.querySelectorAll('#chart path.line-loss')].map((p) => getComputedStyle(p).strokeDasharray)")
    assert dashes[0] == "none" and dashes[1] != "none"
