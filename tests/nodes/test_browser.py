"""The UI workflows in the real ComfyUI frontend: headless Chromium (playwright) on the test server.

Each workflow in workflows/*.json is loaded through the app the way a dropped file is (`app.loadGraphData`),
then read back from the live graph: every node type must be registered in LiteGraph (the frontend found no
missing node), no dialog (missing nodes, load error) and no error toast may appear, the links must be the file's
(the frontend's link validation fixed nothing) and the pack's nodes must show the file's widget values. A
workflow with an unknown node type must be reported missing by the same checks. A screenshot of each workflow is
saved to artifacts/screenshots/<workflow>.png.

Chromium is Debian's (/usr/bin/chromium); playwright never downloads a browser here. Every external request is
aborted, so the page depends on nothing but the local server.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.nodes.comfy_server import REPO_ROOT
from tests.nodes.test_workflow_files import PACK, UI_WORKFLOWS, load_ui, widget_names

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("MMR1_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
SCREENSHOTS = REPO_ROOT / "artifacts" / "screenshots"
VIEWPORT = {"width": 1920, "height": 1080}
TIMEOUT_MS = 20_000  # any single browser action
READY_TIMEOUT_MS = 60_000  # first page load: the frontend bundle and every node definition
SETTLE_MS = 600  # after a load, time for Vue to render a dialog or toast it queued
UNKNOWN_TYPE = "MMR1NodeThatDoesNotExist"
SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 1, "Comfy.Minimap.Visible": False}

# Before any page script: no "try Nodes 2.0" banner, and a log of every dialog and toast that is ever shown (toasts
# expire; a MutationObserver sees them even if they are gone by the time the test looks).
INIT_SCRIPT = """
(() => {
  try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) {}
  const log = window.__mmr1 = { dialogs: [], toasts: [], errors: [], missing: null };
  window.addEventListener('error', (e) => log.errors.push(String(e.message || e)));
  const seen = new WeakSet();
  const scan = (root) => {
    if (!(root instanceof Element)) return;
    const found = [...root.querySelectorAll('.p-dialog, .p-toast-message')];
    if (root.matches('.p-dialog, .p-toast-message')) found.push(root);
    for (const el of found) {
      if (seen.has(el)) continue;
      seen.add(el);
      // Read the text a moment later: Vue fills the element after inserting it.
      setTimeout(() => {
        const text = (el.innerText || el.textContent || '').trim().slice(0, 500);
        if (el.matches('.p-dialog')) log.dialogs.push(text);
        else {
          const severity = (el.className.match(/p-toast-message-(error|warn|info|success|secondary|contrast)/)
                            || [null, 'unknown'])[1];
          log.toasts.push({severity, text});
        }
      }, 50);
    }
  };
  new MutationObserver((mutations) => {
    for (const m of mutations) for (const n of m.addedNodes) scan(n);
  }).observe(document, { childList: true, subtree: true });
})();
"""

READY_JS = """
() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
         && window.LiteGraph.registered_node_types['MMR1LoadModel']
         && (window.app.graph.nodes.length > 0 || document.querySelector('.p-dialog')))
"""

# Registers a frontend extension that records the missing node types loadGraphData itself found.
HOOK_JS = """
() => {
  if (window.__mmr1.hooked) return;
  window.app.registerExtension({
    name: 'MMR1.BrowserTest',
    afterConfigureGraph(missing) {
      window.__mmr1.missing = (missing || []).map((m) => (typeof m === 'string' ? m : m.type));
    },
  });
  window.__mmr1.hooked = true;
}
"""

LOAD_JS = """
async ([workflow, settleMs]) => {
  const log = window.__mmr1;
  log.dialogs.length = 0; log.toasts.length = 0; log.errors.length = 0; log.missing = null;
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));
  let loadError = null;
  try {
    await window.app.loadGraphData(workflow);
  } catch (e) {
    loadError = String(e && e.stack || e);
  }
  await frame(); await frame();  // fitView runs on the next frame
  await new Promise((resolve) => setTimeout(resolve, settleMs));
  window.app.canvas.setDirty(true, true);
  await frame();
  const graph = window.app.graph;
  const serialized = JSON.parse(JSON.stringify(graph.serialize()));
  const visibleDialogs = [...document.querySelectorAll('.p-dialog')]
    .filter((el) => el.offsetParent !== null || el.getClientRects().length > 0)
    .map((el) => (el.innerText || '').trim().slice(0, 500));
  return {
    loadError,
    missingHook: log.missing,
    nodes: graph.nodes.map((n) => ({
      id: n.id,
      type: n.type,
      registered: n.type in LiteGraph.registered_node_types,
      hasErrors: !!n.has_errors,
      widgets: (n.widgets || []).filter((w) => w.serialize !== false).map((w) => [w.name, w.value]),
    })),
    links: serialized.links,
    dialogs: [...log.dialogs],
    visibleDialogs,
    toasts: [...log.toasts],
    errors: [...log.errors],
  };
}
"""

VISIBLE_DIALOGS_JS = """
() => [...document.querySelectorAll('.p-dialog')].filter((el) => el.getClientRects().length > 0)
  .map((el) => (el.innerText || '').trim().slice(0, 200))
"""

# Clicks the close button of each visible dialog (PrimeVue's, or the ✕ icon button of the frontend's own headers).
CLICK_CLOSE_JS = """
() => {
  for (const el of document.querySelectorAll('.p-dialog')) {
    if (el.getClientRects().length === 0) continue;
    const close = el.querySelector('.p-dialog-close-button, button[aria-label="Close" i]')
      || [...el.querySelectorAll('button')].find((b) => b.querySelector('.pi-times, [class*="lucide--x"]'));
    if (close) close.click();
  }
}
"""

# Last resort: the frontend's dialog store (Pinia), which every dialog of the app goes through.
CLOSE_IN_STORE_JS = """
() => {
  const store = document.querySelector('#vue-app')?.__vue_app__?.config.globalProperties.$pinia?._s.get('dialog');
  if (!store) return false;
  for (const dialog of [...(store.dialogStack || [])]) store.closeDialog({ key: dialog.key });
  return true;
}
"""


def _require_chromium() -> str:
    path = shutil.which(CHROMIUM) or (CHROMIUM if Path(CHROMIUM).is_file() else None)
    if path is None:
        message = f"Chromium is not installed at {CHROMIUM}; run `bash .ci/setup`."
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _dismiss_dialogs(page, rounds: int = 5) -> None:
    """Close whatever the frontend opened on start (templates browser, release notes...): Escape, the dialog's
    close button, then the dialog store, until no dialog is visible. Bounded; a dialog that never closes fails."""
    for attempt in range(rounds):
        if not page.evaluate(VISIBLE_DIALOGS_JS):
            return
        if attempt == 0:
            page.keyboard.press("Escape")
        elif attempt < rounds - 2:
            page.evaluate(CLICK_CLOSE_JS)
        else:
            page.evaluate(CLOSE_IN_STORE_JS)
        try:
            page.wait_for_function(f"() => ({VISIBLE_DIALOGS_JS.strip()})().length === 0", timeout=1500, polling=50)
        except sync_api.TimeoutError:
            pass
    remaining = page.evaluate(VISIBLE_DIALOGS_JS)
    assert not remaining, f"dialogs that would not close: {remaining}"


@pytest.fixture(scope="module")
def page(comfy):
    chromium = _require_chromium()
    started = time.monotonic()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        try:
            context = browser.new_context(viewport=VIEWPORT, locale="en-US")  # dialog texts are English
            context.set_default_timeout(TIMEOUT_MS)
            context.add_init_script(INIT_SCRIPT)

            # Nothing outside the test server: fonts, release notes and template thumbnails on the internet fail
            # fast and the same way every run.
            context.route(lambda url: not url.startswith(comfy.url), lambda route: route.abort())

            # A returning user's settings: the first-run templates browser stays closed (dismissed below anyway);
            # for legible screenshots, node text is drawn at any zoom and the minimap is hidden.
            def settings(route):
                if route.request.method != "GET":
                    return route.continue_()
                response = route.fetch()
                values = response.json() if response.ok else {}
                values.update(SETTINGS)
                return route.fulfill(response=response, json=values)

            context.route(f"{comfy.url}/api/settings", settings)
            page = context.new_page()
            page.goto(comfy.url, wait_until="domcontentloaded", timeout=READY_TIMEOUT_MS)
            page.wait_for_function(READY_JS, timeout=READY_TIMEOUT_MS, polling=100)
            page.wait_for_timeout(300)
            _dismiss_dialogs(page)
            page.evaluate(HOOK_JS)
            print(f"\nfrontend ready in {time.monotonic() - started:.1f} s")
            yield page
        finally:
            browser.close()


def load(page, workflow: dict) -> dict:
    _dismiss_dialogs(page)
    return page.evaluate(LOAD_JS, [workflow, SETTLE_MS])


def missing_types(report: dict) -> dict[str, list[str]]:
    """Every sign of a missing node type, by source: the live graph, the frontend's own list, its dialog."""
    graph = sorted({n["type"] for n in report["nodes"] if not n["registered"] or n["hasErrors"]})
    hook = sorted(set(report["missingHook"] or []))
    dialogs = [text for text in report["dialogs"] + report["visibleDialogs"] if "missing" in text.lower()]
    return {key: value for key, value in (("graph", graph), ("frontend", hook), ("dialog", dialogs)) if value}


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_workflow_loads_in_the_frontend(page, name):
    workflow = load_ui(name)
    started = time.monotonic()
    report = load(page, workflow)
    elapsed = time.monotonic() - started

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    screenshot = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(screenshot), full_page=True, timeout=TIMEOUT_MS)
    print(f"\n{name}: loaded in {elapsed:.2f} s; screenshot {screenshot}")

    assert report["loadError"] is None, report["loadError"]
    assert missing_types(report) == {}, f"{name}: missing node types {missing_types(report)}"
    assert report["missingHook"] == [], "the frontend's afterConfigureGraph hook did not run or saw missing nodes"
    assert not report["dialogs"] and not report["visibleDialogs"], f"{name}: dialogs {report['dialogs']}"
    bad_toasts = [toast for toast in report["toasts"] if toast["severity"] in ("error", "warn")]
    assert not bad_toasts, f"{name}: toasts {bad_toasts}"
    assert not report["errors"], f"{name}: page errors {report['errors']}"

    # The graph is the file's: same nodes, same links (validation fixed nothing), same widget values.
    live = {node["id"]: node for node in report["nodes"]}
    assert sorted((n["id"], n["type"]) for n in live.values()) == sorted(
        (n["id"], n["type"]) for n in workflow["nodes"]
    )
    assert sorted(map(tuple, report["links"])) == sorted(map(tuple, workflow["links"]))
    checked = 0
    for node in workflow["nodes"]:
        if node["type"] not in PACK:
            continue
        names = [widget for widget, _ in live[node["id"]]["widgets"]]
        values = [value for _, value in live[node["id"]]["widgets"]]
        assert names == widget_names(node["type"]), f"{name}: node {node['id']} ({node['type']}) widgets"
        assert values == node["widgets_values"], f"{name}: node {node['id']} ({node['type']}) widget values"
        checked += 1
    assert checked >= 2  # every workflow has at least the loader and the grounding node


def test_unknown_node_type_is_reported_missing(page):
    workflow = copy.deepcopy(load_ui("personalized_generation"))
    impostor = next(node for node in workflow["nodes"] if node["type"] == "MMR1SubjectGrounding")
    impostor["type"] = UNKNOWN_TYPE
    impostor["properties"]["Node name for S&R"] = UNKNOWN_TYPE
    report = load(page, workflow)
    try:
        found = missing_types(report)
        print(f"\nunknown node type reported as: {json.dumps(found)[:400]}")
        assert UNKNOWN_TYPE in found.get("graph", []), report["nodes"]
        assert found.get("frontend") == [UNKNOWN_TYPE]
        assert any(UNKNOWN_TYPE in text for text in found.get("dialog", [])), report["dialogs"]
    finally:
        _dismiss_dialogs(page)
    # The rest of the graph still loaded, the unknown node kept as a placeholder.
    assert sorted(node["id"] for node in report["nodes"]) == sorted(node["id"] for node in workflow["nodes"])


def test_templates_browser_opens_the_ui_workflows(page, comfy):
    """ComfyUI lists workflows/*.json of the pack as templates (not the API twins in workflows/api/); the
    Templates browser fetches each from /api/workflow_templates/<pack>/<name>.json, which must be the file."""
    listed = comfy.get("/workflow_templates")
    pack = next(name for name in listed if name.startswith("ComfyUI-MMR1"))
    assert sorted(listed[pack]) == sorted(UI_WORKFLOWS)
    for name in UI_WORKFLOWS:
        path = f"/api/workflow_templates/{pack}/{name}.json"
        status, text = page.evaluate("async (path) => { const r = await fetch(path); return [r.status, await r.text()]; }",
                                     path)
        assert status == 200, f"GET {path} -> {status}"
        assert json.loads(text) == load_ui(name)
