// Small hand-written SVG charts: line curves per series, horizontal bars, a heatmap table.
import { h, s } from "./dom.js";

export const COLORS = ["#2f6fde", "#e0803a", "#1f8a4c", "#b03fb0", "#c23b32", "#6b7a90", "#a08a1c", "#1ba3b3"];

const niceNum = (x) => (Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(2));

/**
 * A line chart. series: [{name, color, points: [[x, y], ...], dashed}]; null y values break the line.
 * Options: title, log (log-scale y), yMin/yMax (fixed range), width, height.
 */
export function lineChart(series, { title = "", log = false, yMin, yMax, width = 340, height = 190 } = {}) {
  const pad = { l: 42, r: 10, t: 20, b: 22 };
  const all = series.flatMap((se) => se.points).filter(([, y]) => y !== null && isFinite(y) && (!log || y > 0));
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
  svg.append(s("text", { x: pad.l, y: 13 }, title));
  if (!all.length) {
    svg.append(s("text", { x: width / 2 - 20, y: height / 2 }, "no data yet"));
    return h("div", {}, svg);
  }
  const tf = log ? Math.log10 : (y) => y;
  const xs = all.map(([x]) => x);
  let lo = yMin ?? Math.min(...all.map(([, y]) => tf(y)));
  let hi = yMax ?? Math.max(...all.map(([, y]) => tf(y)));
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const px = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const py = (y) => pad.t + (1 - (tf(y) - lo) / (hi - lo)) * (height - pad.t - pad.b);
  // axes and 3 y ticks
  svg.append(s("line", { x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b, stroke: "#ccd" }));
  for (let i = 0; i <= 2; i++) {
    const v = lo + ((hi - lo) * i) / 2;
    const y = pad.t + (1 - i / 2) * (height - pad.t - pad.b);
    svg.append(s("line", { x1: pad.l, y1: y, x2: width - pad.r, y2: y, stroke: "#eef" }));
    svg.append(s("text", { x: 2, y: y + 3 }, niceNum(log ? 10 ** v : v)));
  }
  svg.append(s("text", { x: pad.l, y: height - 6 }, String(x0)));
  svg.append(s("text", { x: width - pad.r - 14, y: height - 6 }, String(x1)));
  for (const se of series) {
    let d = "";
    let pen = false;
    for (const [x, y] of se.points) {
      if (y === null || !isFinite(y) || (log && y <= 0)) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`;
      pen = true;
    }
    svg.append(s("path", { d, fill: "none", stroke: se.color, "stroke-width": 1.8,
      "stroke-dasharray": se.dashed ? "4 3" : null }));
    if (se.points.length === 1) {
      const [x, y] = se.points[0];
      if (y !== null) svg.append(s("circle", { cx: px(x), cy: py(y), r: 2.5, fill: se.color }));
    }
  }
  const legend = h("div", { class: "legend" }, series.map((se) => {
    const swatch = h("i");
    swatch.style.background = se.color;
    return h("span", {}, swatch, se.name);
  }));
  return h("div", {}, svg, legend);
}

/**
 * Loss, accuracy and lr charts of epoch records ({member, epoch, train_loss, val_loss, train_acc, val_acc, lr}).
 * `member` and `epoch` are 1-based as the event stream sends them.
 */
export function trainingCharts(records) {
  const members = [...new Set(records.map((r) => r.member))].sort((a, b) => a - b);
  const seriesOf = (key, label, dashed) => members.map((m, i) => ({
    name: `${label}${members.length > 1 ? ` m${m}` : ""}`,
    color: COLORS[i % COLORS.length],
    dashed,
    points: records.filter((r) => r.member === m).map((r) => [r.epoch, r[key] ?? null]),
  }));
  return h("div", { class: "row" },
    lineChart([...seriesOf("train_loss", "train", true), ...seriesOf("val_loss", "val", false)], { title: "loss" }),
    lineChart([...seriesOf("train_acc", "train", true), ...seriesOf("val_acc", "val", false)],
      { title: "accuracy", yMin: 0, yMax: 1 }),
    lineChart(seriesOf("lr", "lr", false), { title: "learning rate (log)", log: true }));
}

/** Horizontal bars: items [{label, value (0..1), text}]. */
export function bars(items, { testid } = {}) {
  return h("div", { "data-testid": testid }, items.map((it) => {
    const fill = h("span");
    fill.style.width = `${Math.max(0, Math.min(1, it.value)) * 100}%`;
    return h("div", { class: "hbar" }, h("span", {}, it.label), h("div", { class: "bar" }, fill),
      h("span", { class: "num" }, it.text));
  }));
}

/** The confusion matrix as a table, each cell shaded by its share of the true class. */
export function heatmap(matrix, labels) {
  const head = h("tr", {}, h("th", {}, "true \\ predicted"), labels.map((l) => h("th", {}, l)));
  const rows = matrix.map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return h("tr", {}, h("th", {}, labels[i]), row.map((n, j) => {
      const td = h("td", { title: `${labels[i]} → ${labels[j]}: ${n}` }, String(n));
      const share = n / total;
      td.style.background = i === j ? `rgba(31,138,76,${share * 0.8})` : `rgba(194,59,50,${share * 0.8})`;
      if (share > 0.55) td.style.color = "#fff";
      return td;
    }));
  });
  return h("table", { class: "heat" }, h("thead", {}, head), h("tbody", {}, rows));
}
