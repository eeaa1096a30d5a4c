"""The dashboard in a real browser: headless Chromium loads the pages from a running `consa serve`,
its JavaScript fetches the v1 API with the key, and we read the DOM it built and the pixels it drew."""

import io
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from consa.cli.client import Client
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
    return {"succeeded": alice.wait(done["id"], poll_s=0.2), "cancelled": alice.wait(long["id"], poll_s=0.2)}


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
