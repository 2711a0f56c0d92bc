// The memory-timeline panel's view: run pickers, the peak and saving lines, the memory chart and the
// per-group bars, drawn with uPlot. Shared as it is by the ComfyUI bottom-panel tab
// (streamline_panel.js) and by the HTML file `streamline profile --html` writes, which inlines this
// module and timeline_logic.js (so imports here stay single-line imports of ./ modules).
// Colours come from ComfyUI's palette variables (--fg-color, --comfy-menu-bg, ...), re-read
// whenever the page's palette changes.

import { MAX_POINTS, MIB, PREDICTED_COLOR, RUN_COLORS, barsRun, checkTimeline, compareRuns, defaultPair, formatMiB, groupBars, peakLabel, runKey, runName, runOptionText, shortName, summarize, timelineChart } from "./timeline_logic.js";

export const PANEL_CSS = `
.sl-panel { box-sizing: border-box; height: 100%; min-height: 240px; display: flex; flex-direction: column;
  gap: 6px; padding: 6px 10px; overflow: auto; color: var(--fg-color, #ddd); background: var(--comfy-menu-bg, #353535);
  font: 12px/1.4 system-ui, sans-serif; }
.sl-panel * { box-sizing: border-box; }
.sl-toolbar { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; }
.sl-toolbar label { display: inline-flex; gap: 6px; align-items: center; color: var(--descrip-text, #999); }
.sl-toolbar select { max-width: 360px; padding: 2px 4px; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #4e4e4e); border-radius: 4px; font: inherit; }
.sl-status { color: var(--descrip-text, #999); }
.sl-status.sl-error { color: var(--error-text, #ff4444); }
.sl-lines { display: flex; flex-direction: column; gap: 2px; }
.sl-line { display: flex; gap: 6px; align-items: baseline; }
.sl-swatch { flex: none; width: 10px; height: 10px; border-radius: 2px; align-self: center; }
.sl-saving { font-weight: 600; }
.sl-empty { color: var(--descrip-text, #999); padding: 12px 0; }
.sl-charts { flex: 1 1 0; display: flex; gap: 12px; min-height: 300px; overflow: hidden; }
.sl-charts.sl-narrow { flex-direction: column; min-height: 620px; }
.sl-chart { position: relative; min-width: 0; }
.sl-memory-chart { flex: 3 1 0; }
.sl-group-chart { flex: 2 1 0; }
.sl-chart-title { color: var(--descrip-text, #999); margin-bottom: 2px; display: flex; gap: 6px; align-items: center; }
.sl-chart-title select { padding: 1px 3px; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #4e4e4e); border-radius: 4px; font: inherit; }
.sl-panel .uplot { font: 11px/1.3 system-ui, sans-serif; color: var(--fg-color, #ddd); }
.sl-panel .u-legend { color: var(--fg-color, #ddd); font-size: 11px; }
.sl-panel .u-legend .u-marker { width: 0.8em; height: 0.8em; }
.sl-panel .u-select { background: var(--content-hover-bg, rgba(128, 128, 128, 0.25)); opacity: 0.5; }
.sl-peak-label { position: absolute; transform: translate(6px, -50%); padding: 1px 4px; border-radius: 3px; white-space: nowrap;
  pointer-events: none; font-size: 11px; color: var(--fg-color, #ddd); background: var(--comfy-menu-bg, #353535);
  border: 1px solid; border-left-width: 4px; z-index: 2; }
.sl-peak-label.sl-left { transform: translate(calc(-100% - 6px), -50%); }
`;

const FALLBACK = { fg: "#dddddd", muted: "#999999", grid: "#4e4e4e", bg: "#353535" };

function cssVar(el, name, fallback) {
  const v = getComputedStyle(el).getPropertyValue(name).trim();
  return v || fallback;
}

/** The palette's colours as the canvas needs them (it cannot read CSS variables itself). */
function themeColors(el) {
  return {
    fg: cssVar(el, "--fg-color", FALLBACK.fg),
    muted: cssVar(el, "--descrip-text", FALLBACK.muted),
    grid: cssVar(el, "--border-color", FALLBACK.grid),
    bg: cssVar(el, "--comfy-menu-bg", FALLBACK.bg),
  };
}

function withAlpha(color, alpha) {
  const m = /^#([0-9a-f]{6})$/i.exec(color);
  if (!m) return color;
  const n = parseInt(m[1], 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

function h(doc, tag, className, text) {
  const el = doc.createElement(tag);
  if (className) el.className = className;
  if (text != null) el.textContent = text;
  return el;
}

function installStyle(doc) {
  if (doc.getElementById("streamline-timeline-css")) return;
  const style = doc.createElement("style");
  style.id = "streamline-timeline-css";
  style.textContent = PANEL_CSS;
  doc.head.appendChild(style);
}

/**
 * A panel showing timeline documents.
 *
 * options.uPlot: the uPlot constructor. options.loadTimeline(key): a promise of the document of a run
 * known only by its summary (the ComfyUI page loads it from the server); without it every run must
 * be given whole with addTimeline. options.maxPoints: points per plotted run at most.
 */
export function createTimelinePanel({ uPlot, loadTimeline = null, maxPoints = MAX_POINTS, document: doc = globalThis.document }) {
  if (typeof uPlot !== "function") throw new Error("timeline panel: uPlot is not loaded");
  installStyle(doc);
  const runs = []; // summaries, newest first
  const docs = new Map(); // key -> document
  const loading = new Map(); // key -> promise
  const charts = [];
  let selected = [null, null];
  let barsKey = null;
  let shownPair = "";
  let mode = "step";
  let colors = null;
  let drawn = null; // what the charts show: { docs, mode, colors }
  let generation = 0;

  const root = h(doc, "div", "sl-panel");
  const toolbar = h(doc, "div", "sl-toolbar");
  const pickA = h(doc, "select", "sl-run-a");
  const pickB = h(doc, "select", "sl-run-b");
  const pickX = h(doc, "select", "sl-x-mode");
  for (const [value, text] of [["step", "denoising step"], ["time", "seconds"]]) {
    const o = h(doc, "option", null, text);
    o.value = value;
    pickX.appendChild(o);
  }
  const labelA = h(doc, "label", null, "run");
  labelA.appendChild(pickA);
  const labelB = h(doc, "label", null, "compared with");
  labelB.appendChild(pickB);
  const labelX = h(doc, "label", null, "x axis");
  labelX.appendChild(pickX);
  const status = h(doc, "span", "sl-status");
  toolbar.append(labelA, labelB, labelX, status);
  const lines = h(doc, "div", "sl-lines");
  const empty = h(doc, "div", "sl-empty",
    "No memory timeline yet. Put a VRAM Profiler node (category Streamline) on the model before the sampler and run " +
    "the graph: each run's timeline appears here when it finishes. Two runs, for example with and without Streamline " +
    "Model, are drawn together with the saving written out.");
  const chartsBox = h(doc, "div", "sl-charts");
  const memoryBox = h(doc, "div", "sl-chart sl-memory-chart");
  const memoryTitle = h(doc, "div", "sl-chart-title", "memory above the first step's start (MiB), dotted: where each step starts; dashed: Streamline's predicted peak");
  const memoryPlot = h(doc, "div", "sl-plot");
  memoryBox.append(memoryTitle, memoryPlot);
  const groupBox = h(doc, "div", "sl-chart sl-group-chart");
  const groupTitle = h(doc, "div", "sl-chart-title");
  const groupPick = h(doc, "select", "sl-bars-run");
  const groupPlot = h(doc, "div", "sl-plot");
  groupBox.append(groupTitle, groupPlot);
  chartsBox.append(memoryBox, groupBox);
  root.append(toolbar, lines, empty, chartsBox);

  function setStatus(text, error = false) {
    status.textContent = text;
    status.classList.toggle("sl-error", error);
  }

  function fillPickers() {
    const fill = (select, value, none) => {
      select.textContent = "";
      if (none) {
        const o = h(doc, "option", null, "nothing");
        o.value = "";
        select.appendChild(o);
      }
      for (const s of runs) {
        const o = h(doc, "option", null, runOptionText(s));
        o.value = runKey(s);
        select.appendChild(o);
      }
      select.value = value ?? "";
    };
    fill(pickA, selected[0], false);
    fill(pickB, selected[1], true);
  }

  function remember(summary) {
    const key = runKey(summary);
    const at = runs.findIndex((s) => runKey(s) === key);
    if (at >= 0) runs.splice(at, 1);
    return key;
  }

  async function docOf(key) {
    if (key == null) return null;
    if (docs.has(key)) return docs.get(key);
    if (!loadTimeline) throw new Error(`no timeline for ${key}`);
    if (!loading.has(key)) {
      loading.set(key, Promise.resolve(loadTimeline(key)).then((d) => {
        docs.set(key, checkTimeline(d));
        return d;
      }).finally(() => loading.delete(key)));
    }
    return loading.get(key);
  }

  function destroyCharts() {
    while (charts.length) charts.pop().destroy();
    memoryPlot.uplot = null;
    groupPlot.uplot = null;
  }

  /** Widths and heights (title excluded) the two charts get in the space the panel has now. */
  function layout() {
    const width = Math.max(chartsBox.clientWidth, 200);
    const narrow = width < 760;
    chartsBox.classList.toggle("sl-narrow", narrow);
    const hasBars = groupBox.style.display !== "none";
    const memoryWidth = narrow || !hasBars ? width : Math.floor(((width - 12) * 3) / 5);
    const groupWidth = narrow ? width : width - 12 - memoryWidth;
    const total = chartsBox.clientHeight || 300;
    const each = narrow && hasBars ? Math.floor((total - 12) / 2) : total;
    return { memory: [memoryWidth, each - memoryTitle.offsetHeight], group: [groupWidth, each - groupTitle.offsetHeight] };
  }

  /** Size a chart so that it and its legend fill [width, height]. */
  function fit(u, [width, height]) {
    const legend = u.root.querySelector(".u-legend");
    const h = Math.max(120, height - (legend ? legend.offsetHeight : 0) - 4);
    if (u.width !== width || u.height !== h) u.setSize({ width, height: h });
  }

  function fitAll() {
    if (!charts.length) return;
    const size = layout();
    fit(charts[0], size.memory);
    if (charts[1]) fit(charts[1], size.group);
  }

  function memoryOptions(chart, size, c) {
    const markers = chart.markers;
    const stride = Math.max(1, Math.ceil((markers.length * 34) / Math.max(size[0] - 70, 50)));
    const series = [{ label: mode === "step" ? "step" : "s", value: (u, v) => (v == null ? "–" : v.toFixed(2)) }];
    chart.series.forEach((s) => {
      const color = RUN_COLORS[s.run % RUN_COLORS.length];
      if (s.kind === "memory") {
        series.push({ label: s.label, stroke: color, width: 1.5, fill: withAlpha(color, 0.08), spanGaps: true,
          paths: uPlot.paths.stepped({ align: -1 }), points: { show: false },
          value: (u, v) => (v == null ? "–" : `${v.toFixed(2)} MiB`) });
      } else if (s.kind === "peak") {
        series.push({ label: "peak", stroke: color, fill: color, width: 0, paths: () => null,
          points: { show: true, size: 9, width: 2, stroke: c.fg, fill: color },
          value: (u, v) => (v == null ? "" : `${v.toFixed(2)} MiB`) });
      } else {
        series.push({ label: "predicted", stroke: color, width: 1, dash: [6, 4], spanGaps: true,
          points: { show: false }, value: (u, v) => (v == null ? "" : `${v.toFixed(2)} MiB`) });
      }
    });
    const axis = { stroke: c.fg, grid: { stroke: withAlpha(c.grid, 1), width: 1 }, ticks: { stroke: c.grid, width: 1 },
      font: "11px system-ui, sans-serif", labelFont: "11px system-ui, sans-serif" };
    return {
      width: size[0], height: size[1],
      scales: { x: { time: false }, y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.15 : 1] } },
      axes: [
        { ...axis, label: mode === "step" ? "denoising step (each step's readings spread across it)" : "step, and seconds since the run started",
          // the x grid lines are the step markers: one where each step starts, one where the last ends
          splits: () => markers.map((m) => m.x),
          values: (u, splits) => splits.map((v, i) => {
            const m = markers[i];
            if (!m || (i % stride !== 0 && i !== splits.length - 1)) return "";
            return mode === "time" ? `${m.label}\n${v.toFixed(2)} s` : m.label;
          }),
          grid: { stroke: withAlpha(c.muted, 0.55), width: 1, dash: [3, 3] } },
        { ...axis, label: "MiB", size: 56 },
      ],
      series,
      cursor: { points: { size: 6 } },
      legend: { live: true },
      hooks: { draw: [(u) => placePeakLabels(u, chart)] },
    };
  }

  function placePeakLabels(u, chart) {
    for (const el of [...u.over.querySelectorAll(".sl-peak-label")]) el.remove();
    chart.series.forEach((s) => {
      if (s.kind !== "peak" || !s.at) return;
      const run = chart.runs[s.run];
      const left = u.valToPos(s.at.x, "x");
      const top = u.valToPos(s.at.y, "y");
      if (!Number.isFinite(left) || !Number.isFinite(top)) return;
      const label = h(doc, "div", "sl-peak-label", `peak ${formatMiB(s.at.y * MIB)} MiB · ${s.at.where}`);
      label.dataset.run = run.key;
      label.style.borderColor = RUN_COLORS[s.run % RUN_COLORS.length];
      label.style.left = `${left}px`;
      label.style.top = `${Math.max(10, top - 14 * s.run)}px`;
      if (left > u.over.clientWidth * 0.6) label.classList.add("sl-left");
      u.over.appendChild(label);
    });
  }

  function groupOptions(bars, runIndex, size, c) {
    const n = bars.names.length;
    const color = RUN_COLORS[runIndex % RUN_COLORS.length];
    const longest = Math.max(4, ...bars.names.map((s) => shortName(s, 18).length));
    const stride = Math.max(1, Math.ceil((n * 13) / Math.max(size[0] - 70, 50)));
    const axis = { stroke: c.fg, grid: { stroke: c.grid, width: 1 }, ticks: { stroke: c.grid, width: 1 },
      font: "10px system-ui, sans-serif", labelFont: "11px system-ui, sans-serif" };
    const series = [{ label: "group", value: (u, v) => (v == null ? "–" : bars.names[v] ?? "") },
      { label: "measured", stroke: color, fill: withAlpha(color, 0.85), width: 1,
        paths: uPlot.paths.bars({ size: [bars.hasPrediction ? 0.42 : 0.7, 40], align: bars.hasPrediction ? -1 : 0 }),
        points: { show: false }, value: (u, v) => (v == null ? "–" : `${v.toFixed(2)} MiB`) }];
    if (bars.hasPrediction) {
      series.push({ label: "predicted by the plan", stroke: PREDICTED_COLOR, fill: withAlpha(PREDICTED_COLOR, 0.75), width: 1,
        paths: uPlot.paths.bars({ size: [0.42, 40], align: 1 }), points: { show: false },
        value: (u, v) => (v == null ? "–" : `${v.toFixed(2)} MiB`) });
    }
    return {
      width: size[0], height: size[1],
      scales: { x: { time: false, range: () => [-0.5, n - 0.5] }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [
        { ...axis, splits: () => bars.names.map((_, i) => i), rotate: -90, size: Math.min(120, 14 + 6 * longest),
          values: (u, splits) => splits.map((i) => (i % stride === 0 ? shortName(bars.names[i] ?? "", 18) : "")), grid: { show: false } },
        { ...axis, label: "MiB", size: 56 },
      ],
      series,
      cursor: { points: { show: false } },
      legend: { live: true },
    };
  }

  function renderLines(shown) {
    lines.textContent = "";
    shown.forEach((d, k) => {
      const line = h(doc, "div", "sl-line");
      const swatch = h(doc, "span", "sl-swatch");
      swatch.style.background = RUN_COLORS[k % RUN_COLORS.length];
      const text = h(doc, "span", "sl-peak-text", peakLabel(d));
      text.dataset.run = runKey(d);
      line.append(swatch, text);
      lines.appendChild(line);
    });
    if (shown.length === 2) {
      const saving = compareRuns(shown[0], shown[1]);
      const line = h(doc, "div", "sl-line sl-saving", saving.text);
      line.dataset.savedBytes = String(saving.savedBytes);
      lines.appendChild(line);
    }
  }

  function draw(shown) {
    destroyCharts();
    if (!root.isConnected || !shown.length) return;
    colors = themeColors(root);
    const chart = timelineChart(shown, { mode, maxPoints });
    const barsDoc = shown.find((d) => runKey(d) === barsKey && groupBars(d).names.length) ?? barsRun(shown);
    groupBox.style.display = barsDoc ? "" : "none";
    const size = layout();
    const memory = new uPlot(memoryOptions(chart, size.memory, colors), chart.data, memoryPlot);
    memoryPlot.uplot = memory;
    memoryPlot.series = chart.series;
    charts.push(memory);
    if (barsDoc) {
      barsKey = runKey(barsDoc);
      const bars = groupBars(barsDoc);
      groupTitle.textContent = "per-group peaks of ";
      groupPick.textContent = "";
      for (const d of shown.filter((x) => groupBars(x).names.length)) {
        const o = h(doc, "option", null, runName(d));
        o.value = runKey(d);
        groupPick.appendChild(o);
      }
      groupPick.value = barsKey;
      groupTitle.append(groupPick, h(doc, "span", null, bars.hasPrediction ? "(MiB above the first step's start), beside the plan's prediction" : "(MiB above the first step's start)"));
      const runIndex = shown.indexOf(barsDoc);
      const group = new uPlot(groupOptions(bars, runIndex, size.group, colors), bars.data, groupPlot);
      groupPlot.uplot = group;
      groupPlot.names = bars.names;
      charts.push(group);
    }
    // uPlot lays out its legend after the constructor returns: size the charts once it has
    requestAnimationFrame(fitAll);
    drawn = { shown, mode, colors: JSON.stringify(colors) };
  }

  async function show() {
    const mine = ++generation;
    const pair = selected.join("\n");
    if (pair !== shownPair) barsKey = null; // the bars follow the shown runs unless picked for them
    shownPair = pair;
    fillPickers();
    const hasRuns = runs.length > 0;
    empty.style.display = hasRuns ? "none" : "";
    chartsBox.style.display = hasRuns ? "" : "none";
    toolbar.style.display = hasRuns ? "" : "none";
    if (!hasRuns) {
      lines.textContent = "";
      destroyCharts();
      return;
    }
    const keys = selected.filter((k, i) => k != null && (i === 0 || k !== selected[0]));
    setStatus(keys.some((k) => !docs.has(k)) ? "loading…" : "");
    let shown;
    try {
      shown = await Promise.all(keys.map(docOf));
    } catch (err) {
      if (mine === generation) setStatus(`could not load a timeline: ${err.message}`, true);
      return;
    }
    if (mine !== generation) return;
    setStatus("");
    renderLines(shown);
    draw(shown);
  }

  pickA.addEventListener("change", () => {
    selected = [pickA.value, selected[1] === pickA.value ? null : selected[1]];
    show();
  });
  pickB.addEventListener("change", () => {
    selected = [selected[0], pickB.value || null];
    show();
  });
  pickX.addEventListener("change", () => {
    mode = pickX.value;
    show();
  });
  groupPick.addEventListener("change", () => {
    barsKey = groupPick.value;
    show();
  });

  // Redraw at the new size, and with the new colours when the page's palette changes.
  let resizeTimer = null;
  const resize = new ResizeObserver(() => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(fitAll, 60);
  });
  resize.observe(chartsBox);
  const palette = new MutationObserver(() => {
    if (drawn && root.isConnected && JSON.stringify(themeColors(root)) !== drawn.colors) draw(drawn.shown);
  });
  palette.observe(doc.documentElement, { attributes: true, attributeFilter: ["style", "class", "data-theme"] });
  if (doc.body) palette.observe(doc.body, { attributes: true, attributeFilter: ["class"] });

  return {
    element: root,
    /** Put the panel into `container` (again) and draw what is selected. */
    mount(container) {
      if (root.parentNode !== container) container.appendChild(root);
      return show();
    },
    unmount() {
      destroyCharts();
      root.remove();
    },
    /** The runs a list route returned (newest first); the newest pair is shown unless one is already. */
    setRuns(summaries) {
      for (const s of [...summaries].reverse()) {
        remember(s);
        runs.unshift(s);
      }
      if (selected[0] == null || !runs.some((s) => runKey(s) === selected[0])) selected = defaultPair(runs);
      return show();
    },
    /** A run that has just finished: it becomes the shown run, beside the run it is best compared with. */
    addTimeline(doc, { select = true } = {}) {
      checkTimeline(doc);
      const summary = summarize(doc);
      const key = remember(summary);
      runs.unshift(summary);
      docs.set(key, doc);
      if (select || selected[0] == null) selected = defaultPair(runs);
      return show();
    },
    /** Show run `a`, and run `b` beside it (null: none). */
    select(a, b = null) {
      selected = [a, b];
      return show();
    },
    get selected() {
      return [...selected];
    },
    destroy() {
      resize.disconnect();
      palette.disconnect();
      destroyCharts();
      root.remove();
    },
  };
}
