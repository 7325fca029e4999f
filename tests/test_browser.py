"""ComfyUI's own page in headless Chromium against a real ComfyUI 0.3.64 server with the pack loaded.

Two frontends: the one ComfyUI 0.3.64 pins (1.27.10, from PyPI) and the newest (1.58.1, served with
``--front-end-root``), the newest in both its node designs: the classic canvas and Nodes 2.0
(``Comfy.VueNodes.Enabled``). Every UI-format workflow (example_workflows/) is opened from the page's
Templates dialog on a server that has only the pack (the demo model and SAEs come with it), checked (no
missing node types, every widget holds the file's value and is a valid choice, every link and required
input connected), queued with the page's Run button and run until its output shows in the page; the others
load in the newest frontend. Screenshots of each graph and its result go to docs/screenshots/ from the
pinned frontend (the README shows them; ``SAEURON_SCREENSHOT_DIR`` overrides). Also: the concept picker opens
on a real click, ticks names, follows the SAE chosen in Load SAE and marks the names that SAE lacks as soon as
its library loads (every frontend and design), and adds the names in the files of Load Concepts nodes on the way;
Save SAE's status and the Feature Inspector's preview show, also inside a subgraph (1.58.1, both designs); every node's help page is served; the pack's errors show in
the page with their message and input; no deprecated frontend API is used by the pack's scripts.

Needs Debian's ``chromium`` and ``chromium-driver`` (scripts/setup_env.sh installs them as root);
without them these tests are skipped, except in CI, where they fail.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import comfy_host
import pytest
from conftest import HOOK

from saeuron_core.sae.concept_files import save_concepts
from saeuron_core.sae.files import load_sae, save_sae
from saeuron_core.sae.library import concept_names, remove_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "example_workflows").glob("*.json"))
API_DIR = ROOT / "docs" / "api-workflows"
SCREENSHOTS = Path(os.environ.get("SAEURON_SCREENSHOT_DIR", ROOT / "docs" / "screenshots"))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without the networking flags Chromium's background services fail in a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,800"]
VIEWPORT = (1920, 1080)  # large enough that LiteGraph draws node text at the fitted zoom
RUN_TIMEOUT_S = int(os.environ.get("SAEURON_RUN_TIMEOUT_S", "300"))


# -- fixtures ------------------------------------------------------------------------------

CONCEPT_FILE = "saeuron-other-styles.safetensors"  # noise and stripes of the demo SAE, for saeuron-other


def _serve(tmp_path_factory, front_end_root, test_saes: bool = True):
    """A ComfyUI server with the pack, whose demo model and SAEs (``saeuron-demo*``) it offers itself. With
    ``test_saes``, also ``saeuron-other`` (the demo SAE keeping only circle and star), an SAE of another width and,
    in ``models/sae_concepts``, the concept file ``CONCEPT_FILE``."""
    srv = comfy_host.ComfyServer(tmp_path_factory.mktemp("browser"), front_end_root=front_end_root)
    if test_saes:
        sae = load_sae(comfy_host.DEMO_ASSETS / "sae.safetensors")
        save_concepts(sae, ["noise", "stripes"], srv.host_dir / "models" / "sae_concepts" / CONCEPT_FILE)
        for name in concept_names(sae):
            if name not in ("circle", "star"):
                remove_concept(sae, name)
        save_sae(sae, srv.models / "sae" / "saeuron-other.safetensors")
        # An SAE of another width: it does not fit the model's block.
        save_sae(TopKSAE(SAEConfig(d_in=48, n_latents=96, k=4, hook_point=HOOK)), srv.models / "sae" / "wide.safetensors")
    with srv:
        # A returning user (no first-run Templates dialog over the canvas); no minimap over the screenshots.
        for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False)):
            assert srv.post(f"/settings/{setting}", value)[0] == 200
        yield srv


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ComfyUI 0.3.64 with the frontend it pins (1.27.10)."""
    yield from _serve(tmp_path_factory, None)


@pytest.fixture(scope="module")
def pack_only_server(tmp_path_factory):
    """ComfyUI 0.3.64 (frontend 1.27.10) with nothing but the pack: what a new user has."""
    yield from _serve(tmp_path_factory, None, test_saes=False)


@pytest.fixture(scope="module")
def newest_server(tmp_path_factory):
    """ComfyUI 0.3.64 with the newest frontend (1.58.1)."""
    yield from _serve(tmp_path_factory, comfy_host.newest_frontend())


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing; scripts/setup_env.sh installs them as root")
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


PAGE_READY_JS = """
const api = window.app?.api ?? window.comfyAPI?.api?.api;
return !!(window.app && app.graph && app.canvas && api?.socket?.readyState === 1 &&
          app.extensions.some(e => e.name === 'SAeUron.ConceptPicker') &&
          document.querySelector('[data-testid="queue-button"]'));
"""


# Records deprecation warnings raised while one of the pack's scripts is on the stack: LiteGraph's own
# (``LiteGraph.onDeprecationWarning``, every time, not once per page) and the app's (``console.warn``).
WATCH_DEPRECATIONS_JS = """
window.saeuronDeprecations = [];
const pack = arguments[0];
const note = (text) => {
  const stack = String(new Error().stack);
  if (/deprecat/i.test(text) && stack.includes(pack)) window.saeuronDeprecations.push(text + '\\n' + stack);
};
if (Array.isArray(LiteGraph.onDeprecationWarning)) {
  LiteGraph.alwaysRepeatWarnings = true;
  LiteGraph.onDeprecationWarning.push((message) => note(String(message)));
}
const warn = console.warn;
console.warn = function (...args) { note(args.map(String).join(' ')); return warn.apply(this, args); };
"""


def open_page(driver, server, nodes2: bool | None = None) -> Any:
    """ComfyUI's page, freshly loaded and connected to the server, with the pack's extensions once each.
    ``nodes2`` (newest frontend only) switches Nodes 2.0 on or off first."""
    if nodes2 is not None:
        assert server.post("/settings/Comfy.VueNodes.Enabled", nodes2)[0] == 200
    driver.get(server.url)
    wait_for(driver, PAGE_READY_JS, timeout=60, what="ComfyUI's page to load and connect")
    names = driver.execute_script("return app.extensions.map(e => e.name).filter(n => n.startsWith('SAeUron'))")
    assert sorted(names) == ["SAeUron.ConceptPicker", "SAeUron.InspectorPreview", "SAeUron.SaveStatus",
                             "SAeUron.ValidationErrors"], names
    if nodes2 is not None:
        assert driver.execute_script("return !!LiteGraph.vueNodesMode") == nodes2
    # The frontends log their own failures at start-up (routes this backend lacks, no network); only
    # the pack's must not be among them. After this, page_errors counts every script error.
    pack = [e for e in page_errors(driver) if "saeuron" in e["message"].lower()]
    assert not pack, f"the page logged errors of the pack while loading: {pack}"
    driver.execute_script(WATCH_DEPRECATIONS_JS, f"/extensions/{comfy_host.PACK_NAME}/")
    return driver


def assert_no_pack_deprecations(driver) -> None:
    """No deprecated frontend API was used by the pack's scripts since the page opened."""
    found = driver.execute_script("return window.saeuronDeprecations")
    assert not found, f"the pack's scripts use deprecated frontend APIs: {found}"


@pytest.fixture()
def page(server, browser):
    """The pinned frontend's page."""
    return open_page(browser, server)


DESIGNS = {"1.27.10": None, "1.58.1": False, "1.58.1-nodes2": True}


@pytest.fixture(params=list(DESIGNS))
def any_page(request, browser):
    """The page of each frontend and node design: the pinned one, the newest, the newest with Nodes 2.0."""
    pinned = request.param == "1.27.10"
    return open_page(browser, request.getfixturevalue("server" if pinned else "newest_server"), DESIGNS[request.param])


# -- page helpers --------------------------------------------------------------------------

def wait_for(driver, script: str, *args: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``script`` (called with ``args``) in the page until it returns something truthy."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# Failures the frontends log on their own on this backend and offline: routes ComfyUI 0.3.64 lacks or
# answers with 404 while empty, and comfy.org (registry look-ups of node types, release notes).
FRONTEND_NOISE = ("favicon.ico", "/api/userdata", "/user.css", "/api/jobs", "Failed to fetch jobs", "/api/global_subgraphs",
                  "/templates/index", "api.comfy.org")


def page_errors(driver) -> list[dict]:
    """Errors in the page's console since the last look, less the frontends' own noise."""
    return [e for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(n in e["message"] for n in FRONTEND_NOISE)]


def assert_no_page_errors(driver, when: str) -> None:
    """No script errors or failed requests in the page's console since the last look."""
    errors = page_errors(driver)
    assert not errors, f"the page logged errors {when}: {errors}"


def load_workflow(driver, workflow: dict) -> None:
    """Load a workflow with the page's own function for dropped files, then fit it into view."""
    error = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "app.loadGraphData(arguments[0]).then(() => done(null), (e) => done(String(e)));", workflow)
    assert error is None, f"app.loadGraphData failed: {error}"
    fit_view(driver)


def fit_view(driver, node_ids: list[int] | None = None) -> None:
    """Zoom and pan the canvas so the nodes (all by default) fill the canvas between the page's bars."""
    driver.execute_script("""
        const ids = arguments[0];
        const nodes = app.canvas.graph._nodes.filter(n => !ids || ids.includes(Number(n.id)));  // 1.58 ids are strings
        const title = LiteGraph.NODE_TITLE_HEIGHT, pad = 30, left = 70, top = 100;  // side bar, top menu
        const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
        const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
        const width = app.canvas.canvas.clientWidth - left - 2 * pad;
        const height = app.canvas.canvas.clientHeight - top - 2 * pad;
        const scale = Math.min(width / (x1 - x0), height / (y1 - y0), 1.25);
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [(left + pad) / scale - x0 + (width / scale - (x1 - x0)) / 2, (top + pad) / scale - y0];
        app.graph.setDirtyCanvas(true, true);
        app.canvas.draw(true, true);
    """, node_ids)


DIALOG_JS = """
const visible = (e) => e && getComputedStyle(e).display !== 'none' && e.getClientRects().length > 0;
const shown = [...document.querySelectorAll('.comfy-modal, .p-dialog')].filter(visible);
"""
PAGE_STATE_JS = DIALOG_JS + """
const num = (id) => (id == null ? id : Number(id));  // 1.58 keeps node ids as strings
return {
  dialog: shown.length ? shown.map(e => e.innerText).join('\\n') : null,
  missing_dialog: shown.some(e => e.querySelector('.comfy-missing-nodes')),
  nodes: app.graph._nodes.map(n => {
    const required = n.constructor.nodeData?.input?.required ?? {};
    return {
      id: num(n.id), type: n.type, title: n.title, registered: n.type in LiteGraph.registered_node_types,
      // Not the frontend's own image-preview widget ($$canvas-image-preview) nor Save SAE's status: not saved.
      widgets: (n.widgets ?? []).filter(w => !String(w.name).startsWith('$$') && w.serialize !== false).map(w => ({
        name: w.name, value: w.value,
        choices: Array.isArray(w.options?.values) ? w.options.values : null,
        min: w.options?.min ?? null, max: w.options?.max ?? null})),
      // Today's frontends give every widget an input socket too; those need no link.
      inputs: (n.inputs ?? []).map(i => ({name: i.name, link: num(i.link), required: i.name in required && !i.widget})),
      outputs: (n.outputs ?? []).map(o => ({name: o.name, links: (o.links ?? []).map(num)})),
    };
  }),
  links: [...(app.graph.links instanceof Map ? app.graph.links.values() : Object.values(app.graph.links))]
    .filter(Boolean).map(l => [num(l.id), num(l.origin_id), l.origin_slot, num(l.target_id), l.target_slot, l.type]),
};
"""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def graph_problems(state: dict, workflow: dict) -> list[str]:
    """What differs between the graph in the page and the workflow file; each line names its node."""
    problems = []
    if state["missing_dialog"]:
        problems.append(f"the page shows the missing-node-types dialog: {state['dialog'].strip()!r}")
    page_nodes = {n["id"]: n for n in state["nodes"]}
    for node in workflow["nodes"]:
        label = f"node {node['id']} ({node['type']})"
        got = page_nodes.get(node["id"])
        if got is None:
            problems.append(f"{label}: not in the page's graph")
            continue
        if not got["registered"]:
            problems.append(f"{label}: node type {node['type']!r} is unknown to this ComfyUI and the pack")
            continue
        values = node.get("widgets_values", [])
        if len(got["widgets"]) != len(values):
            problems.append(f"{label}: the page has {len(got['widgets'])} widgets, the file {len(values)} values")
        for widget, value in zip(got["widgets"], values):
            name = widget["name"]
            if not _same(widget["value"], value):
                problems.append(f"{label}: widget {name} holds {widget['value']!r}, the file has {value!r}")
            if widget["choices"] is not None and widget["value"] not in widget["choices"]:
                problems.append(f"{label}: widget {name} = {widget['value']!r} is not one of {widget['choices']}")
            number = isinstance(widget["value"], (int, float)) and not isinstance(widget["value"], bool)
            if number and widget["min"] is not None and widget["value"] < widget["min"]:
                problems.append(f"{label}: widget {name} = {widget['value']!r} is below its minimum {widget['min']}")
            if number and widget["max"] is not None and widget["value"] > widget["max"]:
                problems.append(f"{label}: widget {name} = {widget['value']!r} is above its maximum {widget['max']}")
        for slot in got["inputs"]:
            if slot["required"] and slot["link"] is None:
                problems.append(f"{label}: required input {slot['name']} is not connected")
    page_links = {link[0]: link for link in state["links"]}
    for link in workflow["links"]:
        link_id, src, src_slot, dst, dst_slot, _ = link
        label = f"link {link_id} from node {src} to node {dst} ({page_nodes.get(dst, {}).get('type', '?')})"
        if page_links.get(link_id) is None or list(page_links[link_id][:5]) != link[:5]:
            problems.append(f"{label}: not connected in the page")
            continue
        dst_node, src_node = page_nodes.get(dst), page_nodes.get(src)
        if dst_node is None or src_node is None or dst_node["inputs"][dst_slot]["link"] != link_id \
                or link_id not in src_node["outputs"][src_slot]["links"]:
            problems.append(f"{label}: the nodes' slots do not hold it")
    return problems


def check_loaded_graph(driver, workflow: dict, name: str) -> None:
    """Fail, naming every offending node, unless the page holds exactly the workflow file's graph."""
    problems = graph_problems(driver.execute_script(PAGE_STATE_JS), workflow)
    if problems:
        raise AssertionError(f"{name} does not load cleanly in ComfyUI's page:\n  " + "\n  ".join(problems))


def screenshot(driver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    # Without the canvas's frame-rate corner the pictures only change when the page does.
    driver.execute_script("app.canvas.show_info = false; app.canvas.draw(true, true);")
    png = driver.get_screenshot_as_png()
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:  # a 256-colour palette keeps the README's pictures small
        image.convert("RGB").quantize(256).save(path, optimize=True)
    return path


def dialog_text(driver, timeout: float = 60) -> str:
    """The text of the dialogs shown: the frontend's own (``.p-dialog``) and the pack's (``.comfy-modal``)."""
    return wait_for(driver, DIALOG_JS + "return shown.length ? shown.map(e => e.innerText).join('\\n') : null;",
                    timeout=timeout, what="ComfyUI's error dialog")


def queue_from_page(driver) -> None:
    """Press the page's Run button."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, '[data-testid="queue-button"]').click()


OUTPUTS_JS = DIALOG_JS + """
if (shown.length) return {error: shown.map(e => e.innerText).join('\\n')};
const outputs = app.graph._nodes.filter(n => n.constructor.nodeData?.output_node);
const outs = outputs.map(n => {
  const images = (n.imgs ?? []).filter(img => img.complete && img.naturalWidth > 0);
  const ui = app.nodeOutputs[n.id];
  return {id: Number(n.id), type: n.type, images: images.map(img => [img.naturalWidth, img.naturalHeight, img.src]),
          text: ui?.text ?? null, ran: !!ui, expected: ui?.images?.length ?? null};
});
const done = outs.length > 0 && outs.every(s => s.ran && (s.expected === null || s.images.length === s.expected));
return {done, shown: outs};
"""


def run_from_page(driver, timeout: float = RUN_TIMEOUT_S) -> list[dict]:
    """Press Queue and wait until every output node shows what it made (images loaded in the page)."""
    queue_from_page(driver)
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = driver.execute_script(OUTPUTS_JS)
        if state.get("error"):
            raise AssertionError(f"the page shows an error dialog: {state['error']}")
        if state["done"]:
            fit_view(driver)
            return state["shown"]
        time.sleep(0.5)
    raise AssertionError(f"outputs did not appear within {timeout} s: {driver.execute_script(OUTPUTS_JS)}")


def nodes2(driver) -> bool:
    """Whether the page shows Nodes 2.0 (each node a DOM element) rather than the classic canvas."""
    return driver.execute_script("return !!LiteGraph.vueNodesMode")


# Nodes 2.0: a widget is an element ``[data-widget-name]`` inside its node ``[data-node-id]``; one that draws
# itself (the concept picker) has its own small canvas there.
WIDGET_CANVAS_JS = """
return document.querySelector(`[data-node-id="${arguments[0]}"] [data-widget-name="${arguments[1]}"] canvas`);
"""


def widget_point(driver, node_id: int, widget: str) -> tuple[float, float]:
    """Viewport coordinates of the middle of a node's widget (as drawn on the canvas, or its element)."""
    if nodes2(driver):
        # The node elements follow a pan or zoom a frame or more later (longer on a busy machine): wait until
        # the widget's canvas is the element under its own middle and stays put across two frames.
        return tuple(wait_for(driver, WIDGET_CANVAS_JS.replace("return ", "const canvas = ", 1) + """
            const middle = () => { const r = canvas?.getBoundingClientRect();
                                   return r && r.width > 0 ? [r.left + r.width / 2, r.top + r.height / 2] : null; };
            const frame = () => new Promise((done) => requestAnimationFrame(() => done()));
            const before = middle();
            return frame().then(frame).then(() => { const after = middle();
                return before && after && before[0] === after[0] && before[1] === after[1]
                    && document.elementFromPoint(...after) === canvas ? after : null; });
        """, node_id, widget, timeout=20, what=f"widget {widget} of node {node_id} to settle"))
    return tuple(driver.execute_script("""
        const node = app.canvas.graph.getNodeById(arguments[0]);
        const w = node.widgets.find(w => w.name === arguments[1]);
        const [x, y] = app.canvas.ds.convertOffsetToCanvas(
            [node.pos[0] + node.size[0] / 2, node.pos[1] + w.last_y + LiteGraph.NODE_WIDGET_HEIGHT / 2]);
        const r = app.canvas.canvas.getBoundingClientRect();
        return [r.left + x, r.top + y];
    """, node_id, widget))


def red_pixels(driver, node_id: int, widget: str) -> int:
    """How many pixels of a widget are drawn in the picker's red (names the SAE lacks): on the widget's own
    canvas in Nodes 2.0, on the graph canvas where the widget is drawn otherwise."""
    return driver.execute_script("""
        const red = (d) => { let n = 0; for (let i = 0; i < d.length; i += 4)
            n += d[i] > 200 && d[i + 1] < 140 && d[i + 2] < 140 && d[i + 3] > 0; return n; };
        const own = arguments[2];
        if (own) return red(own.getContext('2d').getImageData(0, 0, own.width, own.height).data);
        app.canvas.draw(true, true);
        const node = app.canvas.graph.getNodeById(arguments[0]);
        const w = node.widgets.find(w => w.name === arguments[1]);
        const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] + w.last_y]);
        const [x1, y1] = app.canvas.ds.convertOffsetToCanvas(
            [node.pos[0] + node.size[0], node.pos[1] + w.last_y + LiteGraph.NODE_WIDGET_HEIGHT]);
        const ctx = app.canvas.canvas.getContext('2d');
        return red(ctx.getImageData(x0, y0, x1 - x0, y1 - y0).data);
    """, node_id, widget, driver.execute_script(WIDGET_CANVAS_JS, node_id, widget) if nodes2(driver) else None)


def choose(driver, node_id: int, widget: str, value: str) -> None:
    """Choose a combo widget's value with real clicks: its menu on the canvas, or its list in Nodes 2.0."""
    from selenium.webdriver.common.by import By

    if not nodes2(driver):
        assert value in open_widget_menu(driver, node_id, widget)
        click_menu_entry(driver, value)
        return
    driver.find_element(By.CSS_SELECTOR, f'[data-node-id="{node_id}"] [data-widget-name="{widget}"] [role="combobox"]').click()
    option = wait_for(driver, "return [...document.querySelectorAll('[role=option]')].find(e => e.innerText.trim() === arguments[0]);",
                      value, timeout=20, what=f"{value} in the list of widget {widget}")
    option.click()


def click_at(driver, point: tuple[float, float]) -> None:
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(point[0]), int(point[1])).click()
    actions.perform()


def open_widget_menu(driver, node_id: int, widget: str) -> list[str]:
    """Click a widget on the canvas (pointer down and up where it is drawn) and return the entries of the
    menu it opens."""
    menu = ("const m = document.querySelector('.litecontextmenu');"
            "return m ? [...m.querySelectorAll('.litemenu-entry')].map(e => e.innerText.trim()) : null;")
    for attempt in range(3):  # a click the page was too busy to take is clicked again, as a user would
        driver.execute_script("LiteGraph.closeAllContextMenus(window);")
        click_at(driver, widget_point(driver, node_id, widget))
        try:
            return wait_for(driver, menu, timeout=10, what=f"the menu of widget {widget} on node {node_id}")
        except AssertionError:
            if attempt == 2:
                raise


def click_menu_entry(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    for entry in driver.find_elements(By.CSS_SELECTOR, ".litecontextmenu .litemenu-entry"):
        if entry.text.strip() == text:
            entry.click()
            return
    raise AssertionError(f"no menu entry {text!r}")


def widget_value(driver, node_id: int, widget: str) -> Any:
    return driver.execute_script("return app.canvas.graph.getNodeById(arguments[0]).widgets.find(w => w.name === arguments[1]).value;",
                                 node_id, widget)


def set_widget(driver, node_id: int, widget: str, value: Any) -> None:
    """Set a widget's value as typing it in would (value and the widget's callback)."""
    driver.execute_script("""
        const node = app.canvas.graph.getNodeById(arguments[0]);
        const w = node.widgets.find(w => w.name === arguments[1]);
        w.value = arguments[2];
        w.callback?.(w.value, app.canvas, node);
        app.graph.setDirtyCanvas(true, true);
    """, node_id, widget, value)


# -- tests ---------------------------------------------------------------------------------

def open_template(driver, name: str, node_count: int) -> None:
    """Open one of the pack's example workflows from the page's Templates dialog (a click on its card)."""
    driver.execute_script("app.graph.clear(); app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    # Choose the pack in the dialog's side bar until its card shows (a click while the dialog still renders
    # can be lost).
    card = wait_for(driver, """
        const card = document.querySelector(arguments[0]);
        if (card) return card;
        [...document.querySelectorAll('.p-dialog *')].find(
            e => !e.children.length && e.innerText?.trim() === arguments[1])?.click();
        return null;""", f"[data-testid='template-workflow-{name}']", comfy_host.PACK_NAME,
                    timeout=30, interval=0.5, what=f"{name} under {comfy_host.PACK_NAME} in the Templates dialog")
    card.click()
    wait_for(driver, DIALOG_JS + "return !shown.length && app.graph._nodes.length === arguments[0];", node_count,
             timeout=30, what=f"{name} to open from the dialog")
    fit_view(driver)


INSPECTOR_PREVIEW_JS = """
// The Feature Inspector's preview: the images the classic canvas draws on the node, or the node's <img>
// elements in Nodes 2.0; [width, height, src] of each loaded one.
const node = app.canvas.graph._nodes.find(n => n.type === 'SAeUronFeatureInspector');
const imgs = LiteGraph.vueNodesMode
  ? [...(document.querySelector(`[data-node-id="${node.id}"]`)?.querySelectorAll('img') ?? [])]
      .filter(i => i.getClientRects().length)
  : (node.imgs ?? []);
const loaded = imgs.filter(i => i.complete && i.naturalWidth > 0);
return loaded.length ? loaded.map(i => [i.naturalWidth, i.naturalHeight, i.src]) : null;
"""
SAVE_STATUS_JS = """
const e = document.querySelector('.saeuron-save-status');
return e && e.getClientRects().length && getComputedStyle(e).visibility !== 'hidden' ? e.innerText.trim() : null;
"""


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_example_workflow_runs_from_the_templates_dialog(pack_only_server, browser, path):
    """A new user's ComfyUI (only the pack, nothing copied into models/) opens every example workflow from the
    Templates dialog and runs it from the Run button until its pictures show."""
    page = open_page(browser, pack_only_server)
    workflow = json.loads(path.read_text())
    open_template(page, path.stem, len(workflow["nodes"]))
    check_loaded_graph(page, workflow, f"the template {path.stem}")
    screenshot(page, f"{path.stem}-graph")

    shown = run_from_page(page)
    saves = [n for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")]
    images = {s["id"]: s["images"] for s in shown}
    api = json.loads((API_DIR / f"{path.stem}.api.json").read_text())
    expected = comfy_host.expected_images(api)
    side = api["5"]["inputs"]["width"]
    for node in saves:
        count, size = expected[str(node["id"])]
        assert len(images[node["id"]]) == count, f"node {node['id']} shows {images[node['id']]}"
        for width, height, src in images[node["id"]]:
            assert (width, height) == (size, size) and "/view?" in src
            with urllib.request.urlopen(src, timeout=30) as r:  # what the page shows is the saved file
                assert r.headers["Content-Type"] == "image/png" and len(r.read()) > 50
    if path.stem == "inspect_features":  # the heat-map overlay also shows in the inspector node itself
        preview = wait_for(page, INSPECTOR_PREVIEW_JS, timeout=30, what="the Feature Inspector's preview")
        assert len(preview) == 1 and preview[0][:2] == [side, side] and "type=temp" in preview[0][2]
    if path.stem == "learn_concept":
        texts = {s["id"]: s["text"] for s in shown}
        assert texts[7] == ["saved saeuron-demo-learned.safetensors"]
        assert wait_for(page, SAVE_STATUS_JS, timeout=10, what="Save SAE's status") == \
            "✔ saved saeuron-demo-learned.safetensors"
    else:
        assert saves, f"{path.name} has no image output"
    check_loaded_graph(page, workflow, path.name)  # running changed no widget (seeds are fixed)
    screenshot(page, f"{path.stem}-result")
    assert_no_page_errors(page, f"while opening and running the template {path.stem}")
    assert_no_pack_deprecations(page)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_workflow_loads_in_the_newest_frontend(newest_server, browser, path):
    page = open_page(browser, newest_server, nodes2=False)
    workflow = json.loads(path.read_text())
    load_workflow(page, workflow)
    check_loaded_graph(page, workflow, path.name)
    assert_no_page_errors(page, f"while loading {path.name} in the newest frontend")


def test_a_workflow_runs_in_the_newest_frontend(newest_server, browser):
    page = open_page(browser, newest_server, nodes2=False)
    load_workflow(page, json.loads((ROOT / "example_workflows" / "erase_style.json").read_text()))
    shown = run_from_page(page)
    expected = comfy_host.expected_images(json.loads((API_DIR / "erase_style.api.json").read_text()))
    assert {str(s["id"]): len(s["images"]) for s in shown} == {k: v[0] for k, v in expected.items()}
    assert_no_page_errors(page, "while running erase_style.json in the newest frontend")


@pytest.mark.parametrize("design", [False, True], ids=["classic", "nodes2"])
def test_save_status_and_inspector_preview_show_in_the_newest_frontend(newest_server, browser, design):
    """Save SAE's status and the Feature Inspector's preview, in both node designs of frontend 1.58.1; the
    preview also for an inspector inside a subgraph (run from the root graph, shown when the subgraph is open)."""
    page = open_page(browser, newest_server, nodes2=design)
    name = "nodes2" if design else "classic"
    load_workflow(page, json.loads((ROOT / "example_workflows" / "learn_concept.json").read_text()))
    run_from_page(page)
    assert wait_for(page, SAVE_STATUS_JS, timeout=20, what="Save SAE's status") == "✔ saved saeuron-demo-learned.safetensors"
    if design:
        screenshot(page, "nodes2-save-status")

    inspect = json.loads((ROOT / "example_workflows" / "inspect_features.json").read_text())
    side = inspect["nodes"][[n["type"] for n in inspect["nodes"]].index("SAeUronEmptyLatent")]["widgets_values"][0]
    load_workflow(page, inspect)
    queue_from_page(page)
    preview = wait_for(page, INSPECTOR_PREVIEW_JS, timeout=RUN_TIMEOUT_S, what=f"the Feature Inspector's preview ({name})")
    assert len(preview) == 1 and preview[0][:2] == [side, side] and "type=temp" in preview[0][2]

    # The inspector alone in a subgraph: the page runs it as "<subgraph node>:<id>".
    load_workflow(page, inspect)
    page.execute_script("""
        const graph = app.canvas.graph;
        const { subgraph, node } = graph.convertToSubgraph(new Set([graph.getNodeById(6)]));
        app.canvas.openSubgraph(subgraph, node);
    """)
    wait_for(page, "return !app.canvas.graph.isRootGraph && app.canvas.graph._nodes.some("
                   "n => n.type === 'SAeUronFeatureInspector')", timeout=20, what="the subgraph to open")
    fit_view(page)
    assert page.execute_script(INSPECTOR_PREVIEW_JS) is None
    # Another input (seed is promoted to the subgraph node): the server would otherwise take the result from
    # its cache and send no preview for the new id.
    set_widget(page, 6, "top_features", 7)
    queue_from_page(page)
    preview = wait_for(page, INSPECTOR_PREVIEW_JS, timeout=RUN_TIMEOUT_S,
                       what=f"the preview of the Feature Inspector inside a subgraph ({name})")
    assert len(preview) == 1 and preview[0][:2] == [side, side] and "type=temp" in preview[0][2]
    if design:
        screenshot(page, "nodes2-inspector-in-subgraph")
    assert_no_page_errors(page, f"while running Save SAE and the Feature Inspector ({name})")
    assert_no_pack_deprecations(page)


def test_every_node_has_a_help_page(newest_server):
    """The Info tab of a pack node shows ``/extensions/<pack folder>/docs/<node id>/en.md`` (what frontends 1.27
    to 1.58 request for a node whose python_module is ``custom_nodes.<pack folder>``), served from the pack's
    web directory."""
    info = newest_server.get("/object_info")
    ours = {k: v for k, v in info.items() if v["python_module"] == f"custom_nodes.{comfy_host.PACK_NAME}"}
    assert len(ours) == 9, sorted(ours)
    for node_id, spec in ours.items():
        url = f"{newest_server.url}/extensions/{comfy_host.PACK_NAME}/docs/{node_id}/en.md"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200, url
            text = r.read().decode()
        assert text.startswith(f"# {spec['display_name']}\n"), (node_id, text[:80])
        assert len(text) > 300 and "## Input" in text, node_id


def _broken(kind: str) -> dict:
    workflow = json.loads((ROOT / "example_workflows" / "erase_style.json").read_text())
    eraser = next(n for n in workflow["nodes"] if n["id"] == 6)
    if kind == "unknown node type":
        eraser["type"] = "SAeUronConceptEraserTypo"
    else:
        eraser["widgets_values"][1] = "erase"  # method: not one of ablate / replace
    return workflow


@pytest.mark.parametrize("kind, message", [
    ("unknown node type", r"node 6 \(SAeUronConceptEraserTypo\): node type 'SAeUronConceptEraserTypo' is unknown"),
    ("wrong widget value", r"node 6 \(SAeUronConceptEraser\): widget method = 'erase' is not one of \['ablate', 'replace'\]"),
])
def test_a_broken_workflow_fails_the_check_naming_the_node(page, kind, message):
    workflow = _broken(kind)
    load_workflow(page, workflow)
    with pytest.raises(AssertionError, match=message) as failure:
        check_loaded_graph(page, workflow, "broken.json")
    if kind == "unknown node type":
        assert "missing-node-types dialog" in str(failure.value) and "SAeUronConceptEraserTypo" in str(failure.value)


def test_concept_picker_follows_the_sae_chosen_in_load_sae(any_page, request):
    page = any_page
    design = request.node.callspec.params["any_page"]
    workflow = json.loads((ROOT / "example_workflows" / "erase_style.json").read_text())
    load_workflow(page, workflow)
    fit_view(page, [1, 2, 6])  # close up on Load SAE and the eraser
    assert widget_value(page, 6, "concepts") == "stripes"

    entries = open_widget_menu(page, 6, "concepts")
    assert {"☐ noise", "☑ stripes", "☐ grid", "☐ solid"} <= set(entries) and "Edit as text…" in entries
    assert page.execute_script("return document.querySelector('.litecontextmenu .litemenu-title').innerText") \
        == "Concepts in saeuron-demo-styles.safetensors"
    click_menu_entry(page, "☐ noise")  # the menu stays open: several names can be chosen
    assert widget_value(page, 6, "concepts") == "noise, stripes"
    assert page.execute_script("return document.activeElement?.tagName") != "INPUT"  # no text prompt opened
    if design == "1.27.10":
        screenshot(page, "concept-picker")
    page.execute_script("LiteGraph.closeAllContextMenus(window);")
    assert red_pixels(page, 6, "concepts") == 0  # the SAE knows both names

    # Another SAE in Load SAE: as soon as its library is in, the eraser's widget marks the names it lacks
    # (red outline and text), before its menu is opened again.
    choose(page, 2, "sae_name", "saeuron-other.safetensors")
    assert widget_value(page, 2, "sae_name") == "saeuron-other.safetensors"
    wait_for(page, "return app.canvas.graph.getNodeById(6).widgets.find(w => w.name === 'concepts')"
                   ".saeuronLibrary?.names?.join() === 'circle,star'", timeout=20, what="the other SAE's library")
    deadline = time.time() + 10
    while red_pixels(page, 6, "concepts") < 20 and time.time() < deadline:
        time.sleep(0.2)
    assert red_pixels(page, 6, "concepts") >= 20, f"the names the SAE lacks are not marked ({design})"
    if design == "1.58.1-nodes2":
        screenshot(page, "nodes2-concept-picker-marks")
    entries = open_widget_menu(page, 6, "concepts")
    assert entries[:4] == ["☐ circle", "☐ star", "☑ noise (not in this SAE)", "☑ stripes (not in this SAE)"]
    assert page.execute_script("return document.querySelector('.litecontextmenu .litemenu-title').innerText") \
        == "Concepts in saeuron-other.safetensors"
    click_menu_entry(page, "☐ star")
    click_menu_entry(page, "☑ noise (not in this SAE)")
    assert widget_value(page, 6, "concepts") == "star, stripes"

    # The Feature Inspector offers them too; what the picker wrote is what /prompt gets.
    inspect = json.loads((ROOT / "example_workflows" / "inspect_features.json").read_text())
    load_workflow(page, inspect)
    assert {"☐ star", "☑ stripes"} <= set(open_widget_menu(page, 6, "concepts"))
    click_menu_entry(page, "☐ star")
    prompt = page.execute_async_script("const done = arguments[arguments.length - 1];"
                                       "app.graphToPrompt().then(p => done(p.output));")
    assert prompt["6"]["inputs"]["concepts"] == "star, stripes"

    # An eraser fed by Learn Concept also offers the concept being learned.
    load_workflow(page, json.loads((ROOT / "example_workflows" / "learn_concept.json").read_text()))
    eraser_id = page.execute_script("""
        const eraser = LiteGraph.createNode('SAeUronConceptEraser');
        eraser.pos = [700, 420];
        app.graph.add(eraser);
        app.graph.getNodeById(6).connect(0, eraser, 1);
        return eraser.id;
    """)
    fit_view(page)
    learned = json.loads((API_DIR / "learn_concept.api.json").read_text())["6"]["inputs"]["concept_name"]
    assert {f"☐ {learned}", "☐ star", "☐ stripes"} <= set(open_widget_menu(page, eraser_id, "concepts"))
    assert_no_page_errors(page, "while picking concepts")
    assert_no_pack_deprecations(page)


def test_concept_picker_lists_the_concepts_of_load_concepts_files(page, server):
    """An eraser fed by Load SAE through Load Concepts offers the SAE's concepts and the file's (the route is asked
    for both: ``concepts=<file>``)."""
    load_workflow(page, json.loads((ROOT / "example_workflows" / "erase_style.json").read_text()))
    set_widget(page, 2, "sae_name", "saeuron-other.safetensors")
    page.execute_script("""
        const loader = LiteGraph.createNode('SAeUronLoadConcepts');
        const sae = app.graph.getNodeById(2);
        loader.pos = [sae.pos[0], sae.pos[1] + sae.size[1] + 60];
        app.graph.add(loader);
        loader.widgets.find(w => w.name === 'concepts_name').value = arguments[0];
        sae.connect(0, loader, 0);
        loader.connect(0, app.graph.getNodeById(6), 1);
    """, CONCEPT_FILE)
    fit_view(page)
    wait_for(page, "return app.canvas.graph.getNodeById(6).widgets.find(w => w.name === 'concepts')"
                   ".saeuronLibrary?.names?.join() === 'circle,noise,star,stripes'", timeout=20,
             what="the SAE's and the concept file's names")
    entries = open_widget_menu(page, 6, "concepts")
    assert entries[:4] == ["☐ circle", "☐ noise", "☐ star", "☑ stripes"], entries
    page.execute_script("LiteGraph.closeAllContextMenus(window);")
    with urllib.request.urlopen(f"{server.url}/saeuron/concepts?sae=saeuron-other.safetensors&concepts={CONCEPT_FILE}"
                                f"&concepts={CONCEPT_FILE}", timeout=30) as r:
        assert json.loads(r.read()) == {"sae": "saeuron-other.safetensors", "concepts": ["circle", "noise", "star",
                                        "stripes"], "files": {CONCEPT_FILE: ["noise", "stripes"]}}
    assert_no_page_errors(page, "while picking concepts through Load Concepts")
    assert_no_pack_deprecations(page)


@pytest.mark.parametrize("change, message", [
    ({"concepts": "horse"}, "unknown concept 'horse'; this SAE knows: 'checkerboard', 'gradient'"),
    ({"method": "replace", "strength": 5.0}, "strength: strength must be between 0 and 1 for method 'replace'"),
    ({"sae_name": "wide.safetensors"}, "the SAE expects 48 channels but"),
], ids=["unknown-concept", "bad-strength", "sae-does-not-fit"])
def test_pack_errors_show_in_the_page_with_their_message(page, request, change, message):
    workflow = json.loads((ROOT / "example_workflows" / "erase_style.json").read_text())
    load_workflow(page, workflow)
    for name, value in change.items():
        set_widget(page, 2 if name == "sae_name" else 6, name, value)
    queue_from_page(page)
    text = dialog_text(page)
    # The execution error names the class, the validation dialog the node's title.
    assert message in text and ("SAeUronConceptEraser" in text or "Concept Eraser (SAE) (node 6)" in text), text
    if request.node.callspec.id == "bad-strength":  # reported by the server once per input; shown once
        assert text.count("must be between 0 and 1") == 1, text
    if request.node.callspec.id == "unknown-concept":
        screenshot(page, "error-unknown-concept")


# The toasts shown: frontend 1.58's (``data-testid="toast"``) and PrimeVue's (1.27).
TOAST_JS = """
return [...document.querySelectorAll('[data-testid="toast"], .p-toast-message')]
  .map(e => e.innerText.trim()).find(t => t.includes(arguments[0]));
"""


def test_an_unknown_concept_is_reported_naming_the_input_and_the_concept_in_the_newest_frontend(newest_server, browser):
    """Frontend 1.58.1 reports a failed node in a toast naming only the node; the pack adds its message there."""
    page = open_page(browser, newest_server, nodes2=False)
    load_workflow(page, json.loads((ROOT / "example_workflows" / "erase_style.json").read_text()))
    set_widget(page, 6, "concepts", "horse")
    queue_from_page(page)
    toast = wait_for(page, TOAST_JS, "horse", timeout=60, what="a toast about the unknown concept")
    assert "Concept Eraser (SAE)" in toast and "concepts: unknown concept 'horse'; this SAE knows:" in toast, toast
    assert_no_pack_deprecations(page)


def offered_templates(server) -> dict[str, list[str]]:
    return server.get("/api/workflow_templates")


def test_every_template_has_a_thumbnail(pack_only_server):
    """Each example workflow is offered under the pack's name, and the Templates dialog shows ``<name>.jpg`` (or
    ``.webp``) next to it."""
    server = pack_only_server
    names = offered_templates(server)[comfy_host.PACK_NAME]
    assert sorted(names) == [p.stem for p in UI_FILES]
    missing = []
    for name in names:
        for ext in ("jpg", "webp"):
            try:
                with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{comfy_host.PACK_NAME}/{name}.{ext}",
                                            timeout=30) as r:
                    if r.status == 200 and r.headers["Content-Type"].startswith("image/"):
                        break
            except urllib.error.HTTPError:
                pass
        else:
            missing.append(f"example_workflows/{name}.jpg")
    assert not missing, (f"the Templates dialog shows no picture for these (a 404); tests/test_workflows.py "
                         f"writes them from each workflow's outputs: {missing}")


def test_concept_route_over_http(server):
    def get(query: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"{server.url}/saeuron/concepts{query}", timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    from saeuron_demo.dataset import OBJECTS, STYLES

    assert get("?sae=saeuron-demo.safetensors") == (200, {"sae": "saeuron-demo.safetensors",
                                                           "concepts": sorted(OBJECTS + STYLES)})
    assert get("?sae=saeuron-other.safetensors")[1]["concepts"] == ["circle", "star"]
    assert get("")[0] == 400
    for name in ("../extra_model_paths.yaml", "%2Fetc%2Fpasswd", "..%2F..%2Fserver.log", "nope.safetensors"):
        status, body = get(f"?sae={name}")
        assert status == 404 and "is not in the sae model folders" in body["error"], (name, body)
    req = urllib.request.Request(f"{server.url}/saeuron/concepts?sae=saeuron-demo.safetensors", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:  # read-only: no other method is routed
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 405
