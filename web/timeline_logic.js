// The memory-timeline panel's pure logic: from `streamline.timeline/1` documents (docs/timeline-schema.md)
// to the arrays uPlot draws, the run's peak and where it happened, each group's peak beside the plan's
// prediction, and the saving between two runs. No DOM and no ComfyUI here: the ComfyUI panel
// (streamline_panel.js), the HTML file `streamline profile --html` writes, and the unit tests in
// tests/web/ all use this module as it is.

export const SCHEMA = "streamline.timeline/1";
export const MIB = 1024 * 1024;
/** Points per plotted run at most: longer timelines keep each bucket's largest reading. */
export const MAX_POINTS = 5000;
/** Colours of the runs drawn together (readable on ComfyUI's dark and light palettes). */
export const RUN_COLORS = ["#3b8eea", "#f08c00", "#2f9e44", "#c2255c"];
export const PREDICTED_COLOR = "#8c8c8c";

/** The document itself when it is a timeline this panel can draw; an Error saying why otherwise. */
export function checkTimeline(doc) {
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    throw new TypeError("timeline: expected a JSON object");
  }
  if (doc.schema !== SCHEMA) {
    throw new Error(`timeline: expected schema ${SCHEMA}, got ${JSON.stringify(doc.schema)}`);
  }
  if (!Array.isArray(doc.events)) throw new Error("timeline: `events` must be a list");
  return doc;
}

/** A key naming one run: ComfyUI's prompt id, else its label and start time. */
export function runKey(doc) {
  if (doc.prompt_id) return String(doc.prompt_id);
  return `${doc.label || "run"}@${doc.started_at || ""}`;
}

/** The run's name as the panel writes it. */
export function runName(doc) {
  if (doc.label) return doc.label;
  const id = doc.prompt_id ? String(doc.prompt_id) : "";
  return id ? `run ${id.slice(0, 8)}` : "run";
}

/** The activation peak: the most allocated above what was allocated when the first step started. */
export function activationBytes(doc) {
  if (Number.isFinite(doc.activation_peak_bytes)) return doc.activation_peak_bytes;
  return Math.max(0, (doc.peak_bytes || 0) - (doc.baseline_bytes || 0));
}

/** MiB with two decimals under 10 MiB and one above (the saving and labels use this). */
export function formatMiB(bytes) {
  const mib = bytes / MIB;
  return mib.toFixed(Math.abs(mib) < 10 ? 2 : 1);
}

/** The list route's summary of one timeline document (GET /streamline/timelines). */
export function summarize(doc) {
  return {
    prompt_id: doc.prompt_id ?? null,
    label: doc.label ?? "",
    started_at: doc.started_at ?? "",
    seconds: doc.seconds ?? 0,
    peak_bytes: doc.peak_bytes ?? 0,
    activation_peak_bytes: activationBytes(doc),
    predicted_peak_bytes: doc.predicted_peak_bytes ?? null,
    device: doc.device ?? "",
    granularity: doc.granularity ?? "",
    steps: Array.isArray(doc.steps) ? doc.steps.length : 0,
  };
}

/** What a run selector shows for one run summary. */
export function runOptionText(summary) {
  const when = /T(\d\d:\d\d:\d\d)/.exec(summary.started_at || "");
  const parts = [summary.label || "(no label)"];
  if (when) parts.push(when[1]);
  parts.push(`peak ${formatMiB(activationBytes(summary))} MiB`);
  if (summary.predicted_peak_bytes != null) parts.push("Streamline");
  return parts.join(" · ");
}

/**
 * The x of every event. `step`: step k's events spread evenly over [k, k + 1) in their order,
 * what happens before the first step at 0 and the run's end after the last step (the PNG chart's
 * axis, which lines up runs of different speeds). `time`: seconds since the run started.
 */
export function eventPositions(events, mode = "step") {
  if (mode === "time") return events.map((e) => Number(e.t) || 0);
  if (mode !== "step") throw new Error(`x axis: expected "step" or "time", got ${JSON.stringify(mode)}`);
  const counts = [];
  const ordinals = [];
  let ordinal = -1;
  for (const e of events) {
    if (e.kind === "step_start") {
      ordinal += 1;
      counts.push(0);
    }
    if (ordinal >= 0 && e.kind !== "run_end") counts[ordinal] += 1;
    ordinals.push(ordinal);
  }
  const seen = counts.map(() => 0);
  return events.map((e, i) => {
    const k = ordinals[i];
    if (k < 0) return 0;
    if (e.kind === "run_end") return counts.length;
    const x = k + seen[k] / counts[k];
    seen[k] += 1;
    return x;
  });
}

/** Where each step starts, and where the last one ends: the chart's step markers. */
export function stepMarkers(events, mode = "step") {
  const xs = eventPositions(events, mode);
  const markers = [];
  let last = null;
  events.forEach((e, i) => {
    if (e.kind === "step_start") markers.push({ x: xs[i], step: e.step, label: `${e.step ?? "?"}` });
    if (e.kind === "step_end") last = xs[i];
  });
  if (markers.length) {
    const end = mode === "step" ? markers.length : last;
    if (end != null && end > markers[markers.length - 1].x) markers.push({ x: end, step: null, label: "end" });
  }
  return markers;
}

/**
 * At most `maxPoints` of (xs, ys): when there are more, the points fall into `maxPoints` buckets of
 * consecutive points and each bucket keeps its largest y (so no peak is lost). `index` tells which
 * input point each kept one is.
 */
export function boundPoints(xs, ys, maxPoints = MAX_POINTS) {
  if (xs.length !== ys.length) throw new Error(`points: ${xs.length} x values for ${ys.length} y values`);
  if (!Number.isInteger(maxPoints) || maxPoints < 1) throw new Error(`maxPoints: expected a positive integer, got ${maxPoints}`);
  const n = ys.length;
  if (n <= maxPoints) return { xs: xs.slice(), ys: ys.slice(), index: ys.map((_, i) => i) };
  const out = { xs: [], ys: [], index: [] };
  for (let b = 0; b < maxPoints; b++) {
    const lo = Math.floor((b * n) / maxPoints);
    const hi = Math.floor(((b + 1) * n) / maxPoints);
    let best = lo;
    for (let i = lo + 1; i < hi; i++) if (ys[i] > ys[best]) best = i;
    out.xs.push(xs[best]);
    out.ys.push(ys[best]);
    out.index.push(best);
  }
  return out;
}

/** The first event holding the largest `peak` (the run's peak when no event was dropped), or null. */
export function findPeak(events) {
  let best = -1;
  events.forEach((e, i) => {
    if (best < 0 || e.peak > events[best].peak) best = i;
  });
  if (best < 0) return null;
  const e = events[best];
  const name = e.kind === "group" ? e.name : e.step != null ? "step" : e.kind;
  return { index: best, bytes: e.peak, step: e.step ?? null, name, t: e.t, kind: e.kind };
}

/** Where the run's peak happened, from the timeline's own `peak_step` and `peak_name`. */
export function peakWhere(doc) {
  let where = doc.peak_step != null ? `step ${doc.peak_step}` : "outside the steps";
  if (doc.peak_name && doc.peak_name !== "step") where += `, ${doc.peak_name}`;
  return where;
}

/** One line: the run's activation peak and where it happened (the peak label). */
export function peakLabel(doc) {
  let text = `${runName(doc)}: peak ${formatMiB(activationBytes(doc))} MiB at ${peakWhere(doc)}`;
  if (doc.baseline_bytes) text += ` (${formatMiB(doc.peak_bytes)} MiB allocated in all)`;
  if (doc.predicted_peak_bytes != null) text += `; Streamline predicted ${formatMiB(doc.predicted_peak_bytes)} MiB`;
  return text;
}

/**
 * One run as a plotted series: memory above the baseline (MiB) at each event, bounded to
 * `maxPoints`, with the peak's position and the plan's predicted peak.
 */
export function memorySeries(doc, { mode = "step", maxPoints = MAX_POINTS } = {}) {
  checkTimeline(doc);
  const events = doc.events;
  const base = doc.baseline_bytes || 0;
  const xs = eventPositions(events, mode);
  const ys = events.map((e) => (e.peak - base) / MIB);
  const bounded = boundPoints(xs, ys, maxPoints);
  // The marker sits on the event that held the run's peak; when that event was dropped to keep the
  // timeline bounded, on the event nearest the peak's time, at the recorded peak.
  let at = events.findIndex((e) => e.peak === doc.peak_bytes);
  if (at < 0 && events.length) {
    at = 0;
    events.forEach((e, i) => {
      if (Math.abs(e.t - doc.peak_t) < Math.abs(events[at].t - doc.peak_t)) at = i;
    });
  }
  let kept = bounded.index.indexOf(at);
  if (kept < 0 && bounded.index.length) {
    // bucketing kept another point of the peak's bucket (an equal reading earlier in it)
    kept = bounded.index.findIndex((i) => i > at) - 1;
    if (kept < 0) kept = bounded.index.length - 1;
  }
  const peak = at < 0 ? null : {
    event: at,
    point: kept,
    x: bounded.xs[kept],
    y: ((doc.peak_bytes ?? events[at].peak) - base) / MIB,
    where: peakWhere(doc),
  };
  return {
    key: runKey(doc),
    name: runName(doc),
    xs: bounded.xs,
    ys: bounded.ys,
    index: bounded.index,
    samples: events.length,
    peak,
    markers: stepMarkers(events, mode),
    predicted: doc.predicted_peak_bytes != null ? doc.predicted_peak_bytes / MIB : null,
  };
}

/**
 * Series of different x values on one x axis (what uPlot draws): every point keeps its own row,
 * ordered by x (ties keep series and point order), with null where another series' point is.
 * Returns { x, ys, rows } where rows[s][i] is the row of series s's i-th point.
 */
export function joinSeries(series) {
  const all = [];
  series.forEach((s, k) => s.xs.forEach((x, i) => all.push([x, k, i])));
  all.sort((a, b) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2]);
  const x = all.map((p) => p[0]);
  const ys = series.map(() => new Array(all.length).fill(null));
  const rows = series.map((s) => new Array(s.xs.length));
  all.forEach(([, k, i], row) => {
    ys[k][row] = series[k].ys[i];
    rows[k][i] = row;
  });
  return { x, ys, rows };
}

/**
 * The memory chart of one or more runs as uPlot data: [x, then per run its memory, its peak point
 * and (when planned) its predicted peak as a level line], with a description of every series.
 */
export function timelineChart(docs, { mode = "step", maxPoints = MAX_POINTS } = {}) {
  const runs = docs.map((d) => memorySeries(d, { mode, maxPoints }));
  const joined = joinSeries(runs);
  const n = joined.x.length;
  const data = [joined.x];
  const series = [];
  runs.forEach((run, k) => {
    data.push(joined.ys[k]);
    series.push({ run: k, key: run.key, kind: "memory", label: run.name, points: run.xs.length, samples: run.samples });
    const peak = new Array(n).fill(null);
    if (run.peak) peak[joined.rows[k][run.peak.point]] = run.peak.y;
    data.push(peak);
    series.push({ run: k, key: run.key, kind: "peak", label: `${run.name} peak`, at: run.peak });
    if (run.predicted != null && n) {
      const level = new Array(n).fill(null);
      level[0] = run.predicted;
      level[n - 1] = run.predicted;
      data.push(level);
      series.push({ run: k, key: run.key, kind: "predicted", label: `${run.name} predicted` });
    }
  });
  return { data, series, runs, markers: runs.length ? runs[0].markers : [] };
}

/**
 * Each group's peak above the baseline (the most over its group events) and the plan's prediction
 * for it (null where the plan made none), in the order the groups first ran.
 */
export function groupPeaks(doc) {
  const base = doc.baseline_bytes || 0;
  const rows = new Map();
  for (const e of doc.events || []) {
    if (e.kind !== "group") continue;
    let row = rows.get(e.name);
    if (!row) rows.set(e.name, (row = { name: e.name, measured: 0, predicted: null }));
    row.measured = Math.max(row.measured, e.peak - base);
    if (e.predicted != null) row.predicted = Math.max(row.predicted ?? 0, e.predicted);
  }
  return [...rows.values()];
}

/** The bar chart of one run's group peaks as uPlot data: [index, measured MiB, predicted MiB]. */
export function groupBars(doc) {
  const rows = groupPeaks(doc);
  const names = rows.map((r) => r.name);
  const measured = rows.map((r) => r.measured / MIB);
  const predicted = rows.map((r) => (r.predicted == null ? null : r.predicted / MIB));
  const hasPrediction = predicted.some((v) => v != null);
  const data = [names.map((_, i) => i), measured];
  if (hasPrediction) data.push(predicted);
  return { names, measured, predicted, hasPrediction, data };
}

/**
 * The saving of `run` against `reference`: the difference of their activation peaks, in bytes,
 * MiB and percent of the reference's, and the sentence the panel writes.
 */
export function compareRuns(run, reference) {
  const a = activationBytes(run);
  const b = activationBytes(reference);
  const saved = b - a;
  const percent = b > 0 ? (100 * saved) / b : null;
  const pct = percent == null ? "" : ` (${Math.abs(percent).toFixed(1)}%)`;
  const figures = `activation peak ${formatMiB(a)} MiB against ${formatMiB(b)} MiB`;
  let text;
  if (saved > 0) text = `${runName(run)} saves ${formatMiB(saved)} MiB${pct} against ${runName(reference)}: ${figures}`;
  else if (saved < 0) text = `${runName(run)} uses ${formatMiB(-saved)} MiB${pct} more than ${runName(reference)}: ${figures}`;
  else text = `${runName(run)} and ${runName(reference)} have the same activation peak, ${formatMiB(a)} MiB`;
  return { savedBytes: saved, savedMiB: saved / MIB, percent, text };
}

/**
 * Which two runs to show from summaries (newest first): the newest, and the newest one that differs
 * from it in whether Streamline planned it, else in its label, else the one before it.
 */
export function defaultPair(summaries) {
  if (!summaries.length) return [null, null];
  const key = (s) => runKey(s);
  const a = summaries[0];
  const rest = summaries.slice(1);
  const planned = (s) => s.predicted_peak_bytes != null;
  const b = rest.find((s) => planned(s) !== planned(a)) ?? rest.find((s) => (s.label || "") !== (a.label || "")) ?? rest[0];
  return [key(a), b ? key(b) : null];
}

/** The run the per-group bars show among those drawn: the first with predictions, else the first with groups. */
export function barsRun(docs) {
  const withGroups = docs.filter((d) => (d.events || []).some((e) => e.kind === "group"));
  return withGroups.find((d) => (d.events || []).some((e) => e.kind === "group" && e.predicted != null)) ?? withGroups[0] ?? null;
}

/** A group name short enough for an axis label; the chart's legend shows the whole name. */
export function shortName(name, max = 24) {
  return name.length <= max ? name : `…${name.slice(name.length - max + 1)}`;
}
