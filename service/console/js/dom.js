// A tiny DOM builder: text always goes in as text (never parsed as HTML), so API data cannot inject markup.
const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
export const s = (tag, attrs, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);

export function mount(parent, ...children) {
  parent.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
  return parent;
}

export const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
export const num = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

export function duration(seconds) {
  if (!isFinite(seconds) || seconds < 0) return "–";
  const m = Math.floor(seconds / 60), sec = Math.round(seconds % 60);
  return m ? `${m} min ${sec} s` : `${sec} s`;
}

export const statusBadge = (status) => h("span", { class: `status ${status}` }, status);

export function bar(fraction) {
  const inner = h("span");
  inner.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`;
  return h("div", { class: "bar" }, inner);
}

/** A drop zone with a file picker inside; calls onFiles(File[]) either way. */
export function dropZone({ label, accept, multiple = false, onFiles, testid }) {
  const input = h("input", { type: "file", accept, multiple, "data-testid": testid });
  input.addEventListener("change", () => input.files.length && onFiles([...input.files]));
  const zone = h("div", { class: "drop" }, h("p", {}, label), input);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
  });
  return zone;
}
