// The "Streamline memory" tab of ComfyUI's bottom panel: the VRAM Profiler's timelines, drawn when a
// run finishes (the node's `streamline.timeline` event) and, after a page reload, from the server's
// history (GET /streamline/timelines, then each run's document as it is shown).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { createTimelinePanel } from "./timeline_panel.js";

const EVENT = "streamline.timeline";
const TAB_ID = "streamline-memory";
const UPLOT_JS = new URL("./vendor/uplot/uPlot-1.6.32.iife.min.js", import.meta.url).href;
const UPLOT_CSS = new URL("./vendor/uplot/uPlot-1.6.32.min.css", import.meta.url).href;

function loadUPlot() {
  if (window.uPlot) return Promise.resolve(window.uPlot);
  if (!document.querySelector(`link[href="${UPLOT_CSS}"]`)) {
    const link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = UPLOT_CSS;
    document.head.appendChild(link);
  }
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = UPLOT_JS;
    script.onload = () => (window.uPlot ? resolve(window.uPlot) : reject(new Error("uPlot did not load")));
    script.onerror = () => reject(new Error(`could not load ${UPLOT_JS}`));
    document.head.appendChild(script);
  });
}

async function fetchJson(path) {
  const response = await api.fetchApi(path);
  if (!response.ok) {
    let why = `${response.status} ${response.statusText}`;
    try {
      why = (await response.json()).error || why;
    } catch {
      // not JSON: keep the status line
    }
    throw new Error(`${path}: ${why}`);
  }
  return response.json();
}

/** The panel, its history and its event listener: set up once per page. */
function start() {
  const ready = loadUPlot().then((uPlot) =>
    createTimelinePanel({
      uPlot,
      loadTimeline: (key) => fetchJson(`/streamline/timelines/${encodeURIComponent(key)}`),
    }),
  );
  ready.catch((err) => console.error("Streamline memory panel:", err));

  let container = null;

  app.registerExtension({
    name: "Streamline.MemoryTimeline",
    bottomPanelTabs: [
      {
        id: TAB_ID,
        title: "Streamline memory",
        type: "custom",
        render(el) {
          container = el;
          el.style.height = "100%";
          ready.then((panel) => {
            if (container === el) panel.mount(el);
          }, (err) => {
            el.textContent = `The Streamline memory panel could not start: ${err.message}`;
          });
        },
        destroy() {
          container = null;
          ready.then((panel) => panel.unmount(), () => {});
        },
      },
    ],
    async setup() {
      api.addEventListener(EVENT, (event) => {
        ready.then((panel) => panel.addTimeline(event.detail)).catch((err) => console.error("Streamline memory panel:", err));
      });
      try {
        const [panel, runs] = await Promise.all([ready, fetchJson("/streamline/timelines")]);
        await panel.setRuns(runs);
      } catch (err) {
        console.error("Streamline memory panel: could not read the run history:", err);
      }
    },
  });
}

// ComfyUI serves a pack's web folder under two names when the pack declares it twice (WEB_DIRECTORY
// under the pack's folder name, and pyproject's [tool.comfy] web under the project's name), and then
// loads this module twice, as two modules: the first one to run sets the panel up.
const STARTED = Symbol.for("streamline.memory-timeline-panel");
if (!globalThis[STARTED]) {
  globalThis[STARTED] = import.meta.url;
  start();
}
