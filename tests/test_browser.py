"""Notebook 06 in a real JupyterLab, driven by headless Chromium (issue #8).

JupyterLab runs on 127.0.0.1 with a random token over a temporary copy of notebook 06 whose parameters
cell points at a tier's params file (params/smoke.yaml; params/exact.yaml, whose points are exact: issue
#18) and a temporary output root. ``tests/browser/lab.mjs``
(playwright-core, Debian's /usr/bin/chromium) opens it, waits for the kernel to be idle in the status
bar, runs all (``runmenu:run-all``), clicks the panel's Run button, waits for "win rate over π_sft"
and saves a screenshot to ``outputs/test-artefacts/browser_06_ablations.png`` (``-exact.png`` for the
exact tier; or under ``$VCB_TEST_ARTEFACTS``), with a ``-failure.png`` and the server's log next to it on failure.

The test installs what it needs, idempotently: ``apt-get install chromium`` when /usr/bin/chromium
is missing and ``npm ci`` of the pinned playwright-core (tests/browser/package-lock.json; no browser
download) into ``.cache/browser/``. It needs Node.js >= 20 on PATH. About 2 minutes on 2 CPU cores.
Opt out with ``-m "not browser"``.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from vcb_lib.config import PROJECT_ROOT

pytestmark = pytest.mark.browser

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
CACHE = PROJECT_ROOT / ".cache" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = PROJECT_ROOT / "notebooks" / "06_ablations.ipynb"
TIERS = {"smoke": PROJECT_ROOT / "params" / "smoke.yaml", "exact": PROJECT_ROOT / "params" / "exact.yaml"}
ARTEFACTS = Path(os.environ.get("VCB_TEST_ARTEFACTS", PROJECT_ROOT / "outputs" / "test-artefacts"))
SCRIPT_TIMEOUT_S = 600  # the node script's own limits are shorter; this one only guards against a hang
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError as err:
        pytest.fail(f"{what}: {err}")
    if proc.returncode:
        pytest.fail(f"{what} failed ({' '.join(cmd)}, exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ensure_chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing (as root, else through `sudo -n`)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if not shutil.which("apt-get"):
        pytest.fail(f"{CHROMIUM} is missing and there is no apt-get to install Debian's `chromium`")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and not shutil.which("sudo"):
        pytest.fail(f"{CHROMIUM} is missing: install it as root with `apt-get install -y chromium`")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.run(install, capture_output=True, env=env).returncode:  # stale package lists: update once
        _run([*sudo, "apt-get", "update", "-q"], "apt-get update", env=env, timeout=600)
        _run(install, "apt-get install chromium", env=env, timeout=900)
    if not CHROMIUM.exists():
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} is still missing")
    return CHROMIUM


def ensure_playwright() -> Path:
    """`npm ci` of tests/browser/package-lock.json into .cache/browser (skipped when the lock is unchanged)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("the browser test needs Node.js >= 20 and npm on PATH")
    major = int(_run([node, "--version"], "node --version").stdout.strip().lstrip("v").split(".")[0])
    if major < 20:
        pytest.fail(f"playwright-core needs Node.js >= 20, found {major}")
    lock = (BROWSER_DIR / "package-lock.json").read_bytes()
    stamp = CACHE / ".lock-sha256"
    digest = hashlib.sha256(lock + (BROWSER_DIR / "package.json").read_bytes()).hexdigest()
    installed = CACHE / "node_modules" / "playwright-core" / "package.json"
    if not (installed.is_file() and stamp.is_file() and stamp.read_text() == digest):
        CACHE.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(BROWSER_DIR / name, CACHE / name)
        env = os.environ | {"PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}
        _run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], "npm ci (playwright-core)",
             cwd=CACHE, env=env, timeout=600)
        stamp.write_text(digest)
    return CACHE / "node_modules"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_notebook(folder: Path, output_root: Path, params: Path = TIERS["smoke"]) -> Path:
    """Notebook 06 with ``params`` and a temporary output root; the panel stays on (the default).
    The sweeps are turned off: they would run 2 papermill points before the panel is reachable."""
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "notebook 06 needs exactly one cell tagged 'parameters'"
    overrides = [f"run.output_root={output_root}", "ablation.sweeps=[]"]
    cells[0].source = f"params_path: str = {json.dumps(str(params))}\noverrides: list = {json.dumps(overrides)}\n"
    path = folder / NOTEBOOK.name
    nbformat.write(nb, str(path))
    return path


def lab_settings(folder: Path) -> Path:
    """A private settings folder: no news prompt, every cell rendered (no windowing)."""
    settings = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for name, value in settings.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(value))
    return folder


def wait_for_server(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout} s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen, base: str, token: str) -> None:
    """Ask the server to shut down (it stops its kernels), then end its process group."""
    if proc.poll() is None:
        try:
            req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=10).close()
            proc.wait(timeout=30)
        except (urllib.error.URLError, OSError, subprocess.TimeoutExpired):
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.parametrize("tier", list(TIERS))
def test_notebook_06_panel_in_jupyterlab(tmp_path, tier):
    chromium = ensure_chromium()
    modules = ensure_playwright()
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    stem = "browser_06_ablations" + ("" if tier == "smoke" else f"-{tier}")
    screenshot = ARTEFACTS / f"{stem}.png"
    for stale in (screenshot, ARTEFACTS / f"{stem}-failure.png"):
        stale.unlink(missing_ok=True)

    root, outputs = tmp_path / "lab", tmp_path / "outputs"
    root.mkdir()
    prepare_notebook(root, outputs, TIERS[tier])
    token, port = secrets.token_hex(16), free_port()
    base = f"http://127.0.0.1:{port}"
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "JUPYTERLAB_SETTINGS_DIR": str(lab_settings(tmp_path / "lab-settings")),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "MPLBACKEND": "Agg",
    }
    server_log = ARTEFACTS / f"{stem}-jupyterlab.log"
    started = time.monotonic()
    with server_log.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             "--LabApp.expose_app_in_browser=True", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_server(proc, f"{base}/api/status?token={token}", server_log)
        script = subprocess.Popen(
            ["node", str(BROWSER_DIR / "lab.mjs")], cwd=BROWSER_DIR, start_new_session=True, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=os.environ | {"LAB_URL": f"{base}/lab/tree/{NOTEBOOK.name}?token={token}",
                              "SCREENSHOT": str(screenshot), "PLAYWRIGHT_MODULES": str(modules),
                              "CHROMIUM": str(chromium)})
        try:
            out, _ = script.communicate(timeout=SCRIPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGKILL)
            out, _ = script.communicate()
            pytest.fail(f"lab.mjs hung for {SCRIPT_TIMEOUT_S} s:\n{out[-6000:]}")
        print(out)
        print(f"browser test: {time.monotonic() - started:.0f} s; screenshot {screenshot}")
        assert script.returncode == 0, (
            f"lab.mjs failed (exit {script.returncode}); artefacts in {ARTEFACTS}:\n{out[-6000:]}\n"
            f"--- JupyterLab log ---\n{server_log.read_text()[-4000:]}")
    finally:
        stop_server(proc, base, token)

    data = screenshot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000, f"{screenshot} is not a real screenshot ({len(data)} bytes)"
    points = sorted((outputs / tier / "panel").glob("*/point.json"))  # run.name is the tier's name
    assert len(points) == 1, f"expected one finished point under {outputs / tier / 'panel'}, found {points}"
    record = json.loads(points[0].read_text())
    assert 0.0 <= record["win_rate"] <= 1.0 and record["point"] == points[0].parent.name
    assert record.get("exact", False) == (tier == "exact")  # the exact tier's point holds exact values
