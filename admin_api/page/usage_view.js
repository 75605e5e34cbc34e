// A token's requests by outcome, drawn by the page itself as an SVG bar chart (no library, works offline):
// per hour for the last 7 days, or per day for the last 90. Opened from the "Requests (24 h)" column.

import { api } from "./api.js";
import { openDialog, setUpDialog } from "./dialogs.js";
import { plural, shortDate, shortDateTime } from "./format.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 720;
const HEIGHT = 180;
const AXIS = 28; // room for the scale on the left
export const OUTCOME_LABELS = {
  allowed: "Allowed",
  refused_level: "Refused: access level",
  refused_ip: "Refused: IP range",
  rate_limited: "Rate limited",
  quota_exceeded: "Quota exceeded",
};
const $ = (id) => document.getElementById(id);

const view = {
  dialog: $("usage-dialog"),
  title: $("usage-title"),
  chart: $("usage-chart"),
  legend: $("usage-legend"),
  totals: $("usage-totals"),
  error: $("usage-error"),
  hour: $("usage-hour"),
  day: $("usage-day"),
};
setUpDialog(view.dialog);

const state = { token: null, granularity: "hour", generation: 0 };

function svg(tag, attributes) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  return element;
}

function bucketTotal(bucket, outcomes) {
  return outcomes.reduce((sum, outcome) => sum + bucket[outcome], 0);
}

// Stacked bars, one per bucket, an outcome per colour; each bar's title lists its counts.
export function drawChart(usage) {
  const { buckets, outcomes, granularity } = usage;
  const highest = Math.max(1, ...buckets.map((bucket) => bucketTotal(bucket, outcomes)));
  const step = (WIDTH - AXIS) / buckets.length;
  const chart = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT + 16}`, class: "usage-svg", role: "img", "aria-labelledby": "usage-summary",
  });
  const summary = svg("title", { id: "usage-summary" });
  const total = buckets.reduce((sum, bucket) => sum + bucketTotal(bucket, outcomes), 0);
  const span = granularity === "hour" ? "the last 7 days, per hour" : "the last 90 days, per day";
  summary.textContent = `${plural(total, "request")} in ${span}; the busiest ${granularity} had ${highest}.`;
  chart.append(summary);
  chart.append(svg("line", { x1: AXIS, y1: HEIGHT, x2: WIDTH, y2: HEIGHT, class: "usage-axis" }));
  const top = svg("text", { x: AXIS - 4, y: 10, class: "usage-scale", "text-anchor": "end" });
  top.textContent = String(highest);
  const zero = svg("text", { x: AXIS - 4, y: HEIGHT, class: "usage-scale", "text-anchor": "end" });
  zero.textContent = "0";
  chart.append(top, zero);
  buckets.forEach((bucket, index) => {
    const group = svg("g", { class: "usage-bar", "data-start": bucket.start, "data-total": bucketTotal(bucket, outcomes) });
    const title = svg("title", {});
    const when = granularity === "hour" ? shortDateTime(bucket.start) : shortDate(bucket.start);
    title.textContent = `${when}: ` + outcomes.map((o) => `${OUTCOME_LABELS[o] ?? o} ${bucket[o]}`).join(", ");
    group.append(title);
    let y = HEIGHT;
    for (const outcome of outcomes) {
      if (!bucket[outcome]) continue;
      const height = (bucket[outcome] / highest) * (HEIGHT - 12);
      y -= height;
      group.append(svg("rect", {
        x: (AXIS + index * step + step * 0.1).toFixed(2), y: y.toFixed(2),
        width: Math.max(step * 0.8, 0.5).toFixed(2), height: height.toFixed(2), class: `usage-${outcome}`,
      }));
    }
    chart.append(group);
  });
  const first = svg("text", { x: AXIS, y: HEIGHT + 14, class: "usage-scale" });
  first.textContent = shortDate(usage.from);
  const last = svg("text", { x: WIDTH, y: HEIGHT + 14, class: "usage-scale", "text-anchor": "end" });
  last.textContent = granularity === "hour" ? "now" : "today";
  chart.append(first, last);
  return chart;
}

function legend(usage) {
  const items = usage.outcomes.map((outcome) => {
    const item = document.createElement("li");
    const swatch = svg("svg", { viewBox: "0 0 10 10", class: "usage-swatch", "aria-hidden": "true" });
    swatch.append(svg("rect", { width: 10, height: 10, class: `usage-${outcome}` }));
    item.append(swatch, ` ${OUTCOME_LABELS[outcome] ?? outcome}: ${usage.totals[outcome]}`);
    return item;
  });
  view.legend.replaceChildren(...items);
}

async function show(granularity) {
  const generation = ++state.generation;
  state.granularity = granularity;
  view.hour.setAttribute("aria-pressed", String(granularity === "hour"));
  view.day.setAttribute("aria-pressed", String(granularity === "day"));
  view.error.hidden = true;
  try {
    const usage = await api.tokenUsage(state.token.id, granularity);
    if (generation !== state.generation) return;
    view.chart.replaceChildren(drawChart(usage));
    legend(usage);
    const total = usage.buckets.reduce((sum, bucket) => sum + bucketTotal(bucket, usage.outcomes), 0);
    view.totals.textContent = `${plural(total, "request")} from ${shortDateTime(usage.from)} to now.`;
  } catch (failure) {
    if (generation !== state.generation) return;
    view.chart.replaceChildren();
    view.legend.replaceChildren();
    view.totals.textContent = "";
    view.error.textContent = failure.message;
    view.error.hidden = false;
  }
}

view.hour.addEventListener("click", () => show("hour"));
view.day.addEventListener("click", () => show("day"));

export function openUsage(token, returnFocus) {
  state.token = token;
  view.title.textContent = `Usage of “${token.name}”`;
  view.chart.replaceChildren();
  view.legend.replaceChildren();
  view.totals.textContent = "";
  openDialog(view.dialog, { returnFocus, focus: view.hour });
  return show("hour");
}
