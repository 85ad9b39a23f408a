"""Open the course notebooks in JupyterLab in a real browser, as a learner would, and run them.

nbval (`make test`) proves the kernels run the code; this check proves that JupyterLab serves it:

1. starts `jupyter lab` headless on a free port of 127.0.0.1 (a random token, `--no-browser`, root
   folder notebooks/, PELIB_FAST=1 so the notebooks run at tiny sizes, autosave off and throw-away
   settings/workspace folders, so nothing under notebooks/ is written);
2. drives Debian's `chromium` with Playwright (the system browser: `executable_path`), and for each
   notebook (default 00_backbone, 03_lora, 10_finetune) opens it, clicks Run > Run All Cells, waits
   until every code cell shows an execution count (none `[*]`) and the kernel is idle, then asserts
   there is no error output and, if the source plots (`plt.show()`), that a figure rendered (an
   <img> in an output area with a non-zero natural width);
3. right-clicks 03_lora.py in the file browser > Open With > Jupytext Notebook and asserts it opens
   as a notebook (rendered cells), not in the text editor;
4. saves a screenshot per step under results/lab-check/ (with the server log);
5. stops the kernels, the browser and the server however it ends; every wait is bounded and the
   whole check is capped by --timeout. Exit status 0: all passed; 1: a check failed (message on
   stderr).

Run it with `make lab-check` (installs chromium with apt if missing and the pinned playwright into
.venv), or `.venv/bin/python tools/lab_check.py [--notebooks 00_backbone 03_lora] [--headed]`.
"""
import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
OUT = ROOT / "results" / "lab-check"
DEFAULT = ["00_backbone", "03_lora", "10_finetune"]
RUN_LIMIT = 600  # s for one notebook's Run All (03_lora's rank sweep takes minutes on 2 busy cores)

# JupyterLab user settings for the throw-away settings folder: no autosave (running cells must not
# write outputs into the repo's .ipynb/.py), every cell in the DOM (no windowing), no news toast.
SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}

# One snapshot of the open notebook: its prompts, error outputs, figures, kernel status.
STATE_JS = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!panel) return null;
  const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
    .map(p => p.textContent.trim());
  const errors = [...panel.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map(e => e.textContent).filter(t => t.includes('Traceback') || /^\\w*(Error|Exception)\\b/m.test(t));
  const imgs = [...panel.querySelectorAll('.jp-OutputArea-output img')].map(i => i.naturalWidth);
  const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  return {prompts, errors, imgs, status: ind ? ind.dataset.status : null,
          cells: panel.querySelectorAll('.jp-Cell').length,
          markdown: panel.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown').length,
          editors: document.querySelectorAll('.jp-FileEditor:not(.lm-mod-hidden)').length};
}"""


class CheckFailed(Exception):
    pass


class Deadline:
    """The whole check's time budget: every wait takes min(its own limit, what is left)."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self, cap):
        left = self.end - time.monotonic()
        if left <= 0:
            raise CheckFailed("the check ran out of time (--timeout)")
        return min(cap, left)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp, port, token, log):
    for rel, value in SETTINGS.items():
        path = tmp / "settings" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    env = dict(os.environ, PELIB_FAST="1", JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={NOTEBOOKS}", f"--LabApp.user_settings_dir={tmp / 'settings'}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}", "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0:  # containers and CI run as root
        cmd.append("--allow-root")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def api(base, token, path, method="GET", timeout=10):
    req = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else None


def wait_for_server(server, base, token, deadline):
    end = time.monotonic() + deadline.left(120)
    while time.monotonic() < end:
        if server.poll() is not None:
            raise CheckFailed(f"jupyter lab exited with status {server.returncode} (see server.log)")
        try:
            api(base, token, "/api/status", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise CheckFailed("jupyter lab did not answer on /api/status within 120 s (see server.log)")


def shutdown_kernels(base, token):
    try:
        for k in api(base, token, "/api/kernels"):
            api(base, token, f"/api/kernels/{k['id']}", method="DELETE", timeout=30)
    except OSError:
        pass


def stop_server(server, base, token):
    if server.poll() is None:
        shutdown_kernels(base, token)  # the kernels run in their own sessions: stop them first
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def poll(page, until, seconds, what, every=1.0):
    """Snapshot the notebook every `every` s until `until(state)` is true; fail after `seconds`."""
    end = time.monotonic() + seconds
    state = None
    while time.monotonic() < end:
        state = page.evaluate(STATE_JS)
        if state is not None and until(state):
            return state
        page.wait_for_timeout(every * 1000)
    raise CheckFailed(f"{what}: not done after {seconds:.0f} s; last state: {summary(state)}")


def summary(state):
    if state is None:
        return "no notebook panel"
    s = dict(state, prompts=" ".join(state["prompts"]))
    s["errors"] = [e[-800:] for e in s["errors"]]
    return s


def executed(state):
    return bool(state["prompts"]) and all(re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"])


def run_notebook(page, base, token, name, deadline):
    t0 = time.monotonic()
    page.goto(f"{base}/lab/tree/{name}.ipynb?reset&token={token}", timeout=deadline.left(120) * 1000)
    n_cells = len(json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"])
    poll(page, lambda s: s["cells"] == n_cells and s["status"] == "idle", deadline.left(120),
         f"{name}: open, all cells rendered, kernel idle")
    # Right after the kernel first reports idle, Run All can be a silent no-op (seen under load):
    # focus a cell, click Run > Run All Cells, and click again if no cell started within 30 s.
    for attempt in range(3):
        page.wait_for_timeout(2000)
        page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell").first.click(timeout=10_000)
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click(timeout=10_000)
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click(timeout=10_000)
        try:
            poll(page, lambda s: any(p != "[ ]:" for p in s["prompts"]), deadline.left(30), f"{name}: start")
            break
        except CheckFailed:
            if attempt == 2:
                raise
    # Done: every code cell has a number and the kernel is idle, or an error stopped the run.
    shot = OUT / f"{name}.png"
    try:
        state = poll(page, lambda s: s["errors"] or (executed(s) and s["status"] == "idle"),
                     deadline.left(RUN_LIMIT), f"{name}: Run All Cells")
    except CheckFailed as e:
        page.screenshot(path=shot)
        raise CheckFailed(f"{e}; {shot}") from None
    if state["imgs"]:
        page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img").first \
            .scroll_into_view_if_needed(timeout=10_000)
    page.screenshot(path=shot)
    if state["errors"]:
        raise CheckFailed(f"{name}: error output in the notebook (screenshot {shot}):\n"
                          + state["errors"][0][-2000:])
    plots = "plt.show()" in (NOTEBOOKS / f"{name}.py").read_text()
    if plots and not any(w > 0 for w in state["imgs"]):
        raise CheckFailed(f"{name}: the source plots but no figure rendered "
                          f"(img widths {state['imgs']}); {shot}")
    print(f"ok  {name}: {len(state['prompts'])} code cells run, {len(state['imgs'])} figures, "
          f"{time.monotonic() - t0:.0f} s; {shot.relative_to(ROOT)}", flush=True)


def open_py_as_notebook(page, base, token, name, deadline):
    page.goto(f"{base}/lab?reset&token={token}", timeout=deadline.left(120) * 1000)
    label = page.locator(".jp-DirListing-itemText", has_text=re.compile(rf"^{re.escape(name)}\.py$"))
    item = page.locator(".jp-DirListing-item", has=label)
    item.click(button="right", timeout=deadline.left(60) * 1000)
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Open With$")).click(timeout=10_000)
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Jupytext Notebook$")).click(timeout=10_000)
    state = poll(page, lambda s: s["cells"] > 0 and s["markdown"] > 0, deadline.left(60),
                 f"{name}.py: Open With")
    tab = page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel").first
    title = tab.inner_text(timeout=10_000)
    shot = OUT / f"{name}.py.png"
    page.screenshot(path=shot)
    if title != f"{name}.py" or state["editors"]:
        raise CheckFailed(f"{name}.py did not open as a notebook (tab {title!r}, "
                          f"{state['editors']} text editors); {shot}")
    print(f"ok  {name}.py opens as a notebook through jupytext: {state['cells']} cells; "
          f"{shot.relative_to(ROOT)}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebooks", nargs="+", default=DEFAULT, help="names without extension")
    ap.add_argument("--py", default="03_lora", help="the .py source opened through jupytext")
    ap.add_argument("--timeout", type=float, default=900, help="the whole check, seconds")
    ap.add_argument("--headed", action="store_true", help="show the browser (needs a display)")
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if not chromium:
        sys.exit("lab-check: no `chromium` on PATH (apt-get install -y chromium, or `make lab-check`)")
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("lab-check: playwright is not installed in this Python (`make lab-check` installs it)")

    OUT.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.timeout)
    port, token = free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lab-check-") as tmp, open(OUT / "server.log", "w") as log:
        server = start_server(Path(tmp), port, token, log)
        try:
            wait_for_server(server, base, token, deadline)
            print(f"jupyter lab up on {base} in {time.monotonic() - t0:.0f} s (PELIB_FAST=1)", flush=True)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, headless=not args.headed,
                                             args=["--no-sandbox"], timeout=60_000)
                try:
                    # A fresh page per step (no beforeunload dialog for the unsaved notebook before),
                    # and its kernel shut down after it (2 cores, shared).
                    steps = [(run_notebook, n) for n in args.notebooks] + [(open_py_as_notebook, args.py)]
                    for step, name in steps:
                        page = browser.new_page(viewport={"width": 1400, "height": 1000})
                        page.set_default_timeout(60_000)
                        try:
                            step(page, base, token, name, deadline)
                        finally:
                            page.close()
                            shutdown_kernels(base, token)
                finally:
                    browser.close()
        except (CheckFailed, PlaywrightError) as e:
            print(f"lab-check FAILED after {time.monotonic() - t0:.0f} s: {e}\n(server log: "
                  f"{(OUT / 'server.log').relative_to(ROOT)})", file=sys.stderr)
            return 1
        finally:
            stop_server(server, base, token)
    print(f"lab-check passed in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
