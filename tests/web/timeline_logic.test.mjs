// Unit tests of the panel's pure logic (web/timeline_logic.js) on hand-made timeline documents.
// Run: node --test tests/web/

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  MAX_POINTS, MIB, SCHEMA, activationBytes, barsRun, boundPoints, checkTimeline, compareRuns, defaultPair,
  eventPositions, findPeak, formatMiB, groupBars, groupPeaks, joinSeries, memorySeries, peakLabel, peakWhere,
  runKey, runOptionText, shortName, stepMarkers, summarize, timelineChart,
} from "../../web/timeline_logic.js";

/**
 * A timeline as the recorder writes it: run_start, then per step step_start, call, its groups (name,
 * peak in MiB, predicted MiB or null) and step_end, then run_end; peaks are MiB above `baseline`.
 */
function timeline({ label = "run", promptId = null, baseline = 0, steps = [], predicted = null, t0 = 0 } = {}) {
  const b = baseline * MIB;
  const events = [];
  let t = t0;
  const ev = (kind, name, step, peakMiB, pred = null) => {
    events.push({ t, kind, name, step, sigma: step == null ? null : 10 - step, conds: null,
      allocated: b, reserved: b, peak: b + Math.round(peakMiB * MIB), predicted: pred == null ? null : Math.round(pred * MIB),
      device_used: null });
    t += 0.25;
  };
  ev("run_start", "run", null, 0);
  steps.forEach((groups, k) => {
    ev("step_start", "step", k, 0);
    ev("call", "call", k, 0.5);
    for (const [name, peak, pred] of groups) ev("group", name, k, peak, pred ?? null);
    ev("step_end", "step", k, 0.25);
  });
  ev("run_end", "run", null, 0);
  let peakIndex = 0;
  events.forEach((e, i) => { if (e.peak > events[peakIndex].peak) peakIndex = i; });
  const p = events[peakIndex];
  return {
    schema: SCHEMA, label, prompt_id: promptId, device: "cpu", source: "tracker", granularity: "group",
    started_at: "2025-10-01T12:34:56+00:00", seconds: t, weights_bytes: 0, weights_on_device_bytes: 0,
    partial_load: false, baseline_bytes: b, peak_bytes: p.peak, activation_peak_bytes: p.peak - b,
    peak_step: p.step, peak_name: p.kind === "group" ? p.name : p.step != null ? "step" : p.kind, peak_t: p.t,
    predicted_peak_bytes: predicted == null ? null : Math.round(predicted * MIB), device_total_bytes: null,
    steps: steps.map((_, k) => ({ step: k, sigma: 10 - k, t_start: 0, t_end: 0, peak: 0, calls: 1, conds: ["cond"] })),
    events, dropped_events: 0, snapshot: { why_not: "snapshot_steps is 0" }, streamline: null,
  };
}

const ORIGINAL = timeline({ label: "original", promptId: "p-orig", steps: [
  [["input_blocks.1", 3], ["middle_block", 5], ["output_blocks.2", 8]],
  [["input_blocks.1", 3], ["middle_block", 5.5], ["output_blocks.2", 7]],
] });
const STREAMLINED = timeline({ label: "streamlined", promptId: "p-sl", predicted: 4.5, steps: [
  [["down.0", 2, 2.5], ["mid", 4, 4.5], ["up.0", 3, 3.5]],
  [["down.0", 2.2, 2.5], ["mid", 4.1, 4.5], ["up.0", 3.9, 3.5]],
] });

describe("checkTimeline", () => {
  it("accepts a timeline and says why it refuses anything else", () => {
    assert.equal(checkTimeline(ORIGINAL), ORIGINAL);
    assert.throws(() => checkTimeline(null), /JSON object/);
    assert.throws(() => checkTimeline({ ...ORIGINAL, schema: "streamline.timeline/2" }), /expected schema streamline\.timeline\/1/);
    assert.throws(() => checkTimeline({ ...ORIGINAL, events: {} }), /events/);
  });
});

describe("eventPositions", () => {
  it("spreads each step's events over [k, k + 1), puts the start at 0 and the end after the last step", () => {
    const xs = eventPositions(ORIGINAL.events, "step");
    // run_start, then step 0: step_start, call, 3 groups, step_end (6 events), step 1 likewise, run_end
    assert.deepEqual(xs, [0, 0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1 + 1 / 6, 1 + 2 / 6, 1 + 3 / 6, 1 + 4 / 6, 1 + 5 / 6, 2]);
  });
  it("uses the recorded seconds on the time axis", () => {
    assert.deepEqual(eventPositions(ORIGINAL.events, "time"), ORIGINAL.events.map((e) => e.t));
  });
  it("refuses an unknown axis", () => {
    assert.throws(() => eventPositions(ORIGINAL.events, "frames"), /expected "step" or "time"/);
  });
});

describe("stepMarkers", () => {
  it("marks where every step starts and where the last one ends", () => {
    assert.deepEqual(stepMarkers(ORIGINAL.events, "step").map((m) => [m.x, m.label]), [[0, "0"], [1, "1"], [2, "end"]]);
    const timed = stepMarkers(ORIGINAL.events, "time");
    assert.deepEqual(timed.map((m) => m.x), [0.25, 1.75, 3.0]);
  });
  it("has no markers for a run without steps", () => {
    assert.deepEqual(stepMarkers(timeline().events), []);
  });
});

describe("boundPoints", () => {
  it("keeps every point up to the bound", () => {
    const out = boundPoints([1, 2, 3], [5, 6, 7], 3);
    assert.deepEqual(out, { xs: [1, 2, 3], ys: [5, 6, 7], index: [0, 1, 2] });
  });
  it("keeps each bucket's largest reading beyond the bound, so the peak survives", () => {
    const n = 20000;
    const xs = Array.from({ length: n }, (_, i) => i / 100);
    const ys = Array.from({ length: n }, (_, i) => Math.sin(i / 37) + (i === 12345 ? 50 : 0));
    const out = boundPoints(xs, ys, MAX_POINTS);
    assert.equal(out.xs.length, MAX_POINTS);
    assert.equal(out.ys.length, MAX_POINTS);
    assert.ok(out.index.includes(12345));
    assert.equal(Math.max(...out.ys), Math.max(...ys));
    for (let i = 1; i < out.xs.length; i++) assert.ok(out.xs[i] > out.xs[i - 1], "x stays in order");
    // every kept point is the max of its bucket of 4
    for (let b = 0; b < MAX_POINTS; b++) {
      const bucket = ys.slice(b * 4, b * 4 + 4);
      assert.equal(out.ys[b], Math.max(...bucket));
    }
  });
  it("bounds uneven lengths to exactly the bound", () => {
    const ys = Array.from({ length: 10007 }, (_, i) => i % 13);
    assert.equal(boundPoints(ys.map((_, i) => i), ys, 5000).xs.length, 5000);
  });
  it("refuses mismatched arrays and a bound below one", () => {
    assert.throws(() => boundPoints([1], [1, 2], 5), /1 x values for 2 y values/);
    assert.throws(() => boundPoints([1], [1], 0), /positive integer/);
  });
});

describe("peaks", () => {
  it("finds the first event with the largest peak and names its group", () => {
    const p = findPeak(ORIGINAL.events);
    assert.equal(p.name, "output_blocks.2");
    assert.equal(p.step, 0);
    assert.equal(p.bytes, 8 * MIB);
    assert.equal(findPeak([]), null);
  });
  it("writes where the peak happened from the timeline's peak_step and peak_name", () => {
    assert.equal(peakWhere(ORIGINAL), "step 0, output_blocks.2");
    assert.equal(peakWhere({ peak_step: 3, peak_name: "step" }), "step 3");
    assert.equal(peakWhere({ peak_step: null, peak_name: "run_start" }), "outside the steps, run_start");
    assert.equal(peakLabel(ORIGINAL), "original: peak 8.00 MiB at step 0, output_blocks.2");
    assert.equal(peakLabel(STREAMLINED), "streamlined: peak 4.10 MiB at step 1, mid; Streamline predicted 4.50 MiB");
  });
  it("counts the activation peak above the baseline", () => {
    const resident = timeline({ label: "cuda", baseline: 1000, steps: [[["a", 12]]] });
    assert.equal(activationBytes(resident), 12 * MIB);
    assert.equal(activationBytes({ peak_bytes: 5, baseline_bytes: 7 }), 0);
    assert.match(peakLabel(resident), /^cuda: peak 12\.0 MiB at step 0, a \(1012\.0 MiB allocated in all\)$/);
  });
});

describe("memorySeries", () => {
  it("has one point per recorded event, in MiB above the baseline, with the peak marked", () => {
    const doc = timeline({ label: "x", baseline: 100, steps: [[["a", 1], ["b", 6]], [["a", 2]]] });
    const s = memorySeries(doc);
    assert.equal(s.samples, doc.events.length);
    assert.equal(s.xs.length, doc.events.length);
    assert.deepEqual(s.ys, doc.events.map((e) => (e.peak - 100 * MIB) / MIB));
    assert.equal(s.peak.y, 6);
    assert.equal(s.peak.where, "step 0, b");
    assert.equal(s.ys[s.peak.point], 6);
    assert.equal(s.predicted, null);
    assert.deepEqual(s.markers.map((m) => m.label), ["0", "1", "end"]);
  });
  it("bounds a long run and keeps its peak point", () => {
    const groups = Array.from({ length: 1000 }, (_, i) => [`g${i}`, (i * 7) % 11]);
    groups[777] = ["the-peak", 40];
    const doc = timeline({ label: "long", steps: Array.from({ length: 20 }, () => groups) });
    assert.ok(doc.events.length > 20000);
    const s = memorySeries(doc, { maxPoints: 5000 });
    assert.equal(s.xs.length, 5000);
    assert.equal(s.samples, doc.events.length);
    assert.equal(s.ys[s.peak.point], 40);
    assert.equal(s.peak.where, "step 0, the-peak");
  });
  it("marks the recorded peak near its time when its event was dropped", () => {
    const doc = timeline({ label: "dropped", steps: [[["a", 3], ["b", 9]], [["a", 4]]] });
    const at = doc.events.findIndex((e) => e.name === "b");
    const kept = { ...doc, events: doc.events.filter((_, i) => i !== at), dropped_events: 1 };
    const s = memorySeries(kept);
    assert.equal(s.peak.y, 9);
    assert.equal(s.xs.length, kept.events.length);
  });
});

describe("joinSeries and timelineChart", () => {
  it("puts two runs on one ordered x axis, each point on its own row, null elsewhere", () => {
    const j = joinSeries([{ xs: [0, 1, 2], ys: [1, 2, 3] }, { xs: [0, 0.5, 2], ys: [7, 8, 9] }]);
    assert.deepEqual(j.x, [0, 0, 0.5, 1, 2, 2]);
    assert.deepEqual(j.ys[0], [1, null, null, 2, 3, null]);
    assert.deepEqual(j.ys[1], [null, 7, 8, null, null, 9]);
    assert.deepEqual(j.rows, [[0, 3, 4], [1, 2, 5]]);
  });
  it("keeps every run's own point count, its peak point and its predicted level", () => {
    const chart = timelineChart([STREAMLINED, ORIGINAL]);
    assert.equal(chart.data[0].length, STREAMLINED.events.length + ORIGINAL.events.length);
    assert.deepEqual(chart.series.map((s) => s.kind), ["memory", "peak", "predicted", "memory", "peak"]);
    assert.equal(chart.data.length, 1 + chart.series.length);
    const count = (a) => a.filter((v) => v != null).length;
    assert.equal(count(chart.data[1]), STREAMLINED.events.length);
    assert.equal(count(chart.data[4]), ORIGINAL.events.length);
    assert.deepEqual(chart.data[2].filter((v) => v != null), [Math.round(4.1 * MIB) / MIB]);
    assert.deepEqual(chart.data[5].filter((v) => v != null), [8]);
    assert.deepEqual(chart.data[3].filter((v) => v != null), [4.5, 4.5]);
    for (let i = 1; i < chart.data[0].length; i++) assert.ok(chart.data[0][i] >= chart.data[0][i - 1]);
  });
});

describe("group peaks", () => {
  it("keeps each group's highest peak and the plan's prediction in the order the groups ran", () => {
    assert.deepEqual(groupPeaks(STREAMLINED).map((r) => [r.name, r.measured / MIB, r.predicted / MIB]),
      [["down.0", 2.2, 2.5], ["mid", 4.1, 4.5], ["up.0", 3.9, 3.5]].map(([n, m, p]) => [n, Math.round(m * MIB) / MIB, p]));
    const bars = groupBars(STREAMLINED);
    assert.deepEqual(bars.data[0], [0, 1, 2]);
    assert.ok(bars.hasPrediction);
    assert.equal(bars.data.length, 3);
  });
  it("has no prediction series for a run Streamline did not plan", () => {
    const bars = groupBars(ORIGINAL);
    assert.equal(bars.hasPrediction, false);
    assert.deepEqual(bars.names, ["input_blocks.1", "middle_block", "output_blocks.2"]);
    assert.deepEqual(bars.measured, [3, 5.5, 8]);
    assert.equal(bars.data.length, 2);
  });
  it("picks the planned run for the bars, else one with groups", () => {
    assert.equal(barsRun([ORIGINAL, STREAMLINED]), STREAMLINED);
    assert.equal(barsRun([ORIGINAL]), ORIGINAL);
    assert.equal(barsRun([timeline({ steps: [[]] })]), null);
  });
});

describe("compareRuns", () => {
  it("writes the saving in MiB and percent of the reference's activation peak", () => {
    const c = compareRuns(STREAMLINED, ORIGINAL);
    const saved = ORIGINAL.activation_peak_bytes - STREAMLINED.activation_peak_bytes;
    assert.equal(c.savedBytes, saved);
    assert.ok(Math.abs(c.percent - (100 * saved) / ORIGINAL.activation_peak_bytes) < 1e-9);
    assert.equal(c.text, "streamlined saves 3.90 MiB (48.7%) against original: activation peak 4.10 MiB against 8.00 MiB");
  });
  it("says more, not a negative saving, the other way round", () => {
    const c = compareRuns(ORIGINAL, STREAMLINED);
    assert.ok(c.savedBytes < 0);
    assert.equal(c.text, "original uses 3.90 MiB (95.1%) more than streamlined: activation peak 8.00 MiB against 4.10 MiB");
  });
  it("handles equal runs and a zero reference", () => {
    assert.match(compareRuns(ORIGINAL, ORIGINAL).text, /same activation peak, 8\.00 MiB/);
    const zero = { ...ORIGINAL, label: "zero", activation_peak_bytes: 0 };
    assert.equal(compareRuns(ORIGINAL, zero).percent, null);
  });
});

describe("picking runs", () => {
  it("shows the newest run beside the newest one that differs in being planned", () => {
    const runs = [summarize(STREAMLINED), summarize({ ...STREAMLINED, prompt_id: "p-sl-old" }), summarize(ORIGINAL)];
    assert.deepEqual(defaultPair(runs), ["p-sl", "p-orig"]);
  });
  it("falls back to another label, then to the run before", () => {
    const a = summarize({ ...ORIGINAL, prompt_id: "a", label: "x" });
    const b = summarize({ ...ORIGINAL, prompt_id: "b", label: "x" });
    const c = summarize({ ...ORIGINAL, prompt_id: "c", label: "y" });
    assert.deepEqual(defaultPair([a, b, c]), ["a", "c"]);
    assert.deepEqual(defaultPair([a, b]), ["a", "b"]);
    assert.deepEqual(defaultPair([a]), ["a", null]);
    assert.deepEqual(defaultPair([]), [null, null]);
  });
  it("names runs without a prompt id by label and start time, and describes them for the pickers", () => {
    assert.equal(runKey({ label: "l", started_at: "s" }), "l@s");
    assert.equal(runOptionText(summarize(STREAMLINED)), "streamlined · 12:34:56 · peak 4.10 MiB · Streamline");
    assert.equal(summarize(ORIGINAL).steps, 2);
  });
});

describe("formatting", () => {
  it("uses two decimals under 10 MiB and one above", () => {
    assert.equal(formatMiB(1.234 * MIB), "1.23");
    assert.equal(formatMiB(123.45 * MIB), "123.5");
    assert.equal(formatMiB(-2 * MIB), "-2.00");
  });
  it("shortens long group names from the front", () => {
    assert.equal(shortName("short"), "short");
    const s = shortName("up_blocks.3.attentions.0.temporal", 20);
    assert.equal(s.length, 20);
    assert.ok(s.endsWith("attentions.0.temporal".slice(-19)));
  });
});
