// New job: a form built from the API's own JobCreate schema (/openapi.json), started from a named preset.
import { api } from "../api.js";
import { h, mount } from "../dom.js";

let openapi = null;

function resolve(schema) {
  // $ref, a one-element allOf, or "X or null" (anyOf with null): the schema itself plus `nullable`.
  let out = schema;
  if (out.allOf && out.allOf.length === 1) out = { ...out.allOf[0], ...out, allOf: undefined };
  if (out.anyOf) {
    const rest = out.anyOf.filter((x) => x.type !== "null");
    if (rest.length === 1) out = { ...out, ...rest[0], anyOf: undefined, nullable: rest.length < out.anyOf.length };
  }
  if (out.$ref) {
    const target = openapi.components.schemas[out.$ref.split("/").pop()];
    out = { ...target, ...out, $ref: undefined, description: out.description || target.description };
  }
  return out;
}

const title = (name, schema) => schema.title || name.replace(/_/g, " ");
const get = (obj, path) => path.reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);

function setPath(obj, path, value) {
  let o = obj;
  for (const k of path.slice(0, -1)) o = o[k] = o[k] && typeof o[k] === "object" ? o[k] : {};
  o[path.at(-1)] = value;
}

/** One input for a leaf field; it knows how to read its value back. */
function input(name, schema) {
  if (schema.enum) return h("select", { name }, schema.enum.map((v) => h("option", { value: v }, v)));
  if (schema.type === "boolean") return h("input", { type: "checkbox", name });
  if (schema.type === "integer" || schema.type === "number") {
    return h("input", { type: "number", name, min: schema.minimum, max: schema.maximum,
      step: schema.type === "integer" ? 1 : "any", placeholder: schema.nullable ? "empty: none" : null });
  }
  return h("input", { type: "text", name, size: 28,
    placeholder: schema.type === "array" ? "comma-separated" : schema.nullable ? "empty: none" : null });
}

function writeValue(el, schema, value) {
  if (el.type === "checkbox") el.checked = Boolean(value);
  else if (value === null || value === undefined) el.value = "";
  else if (Array.isArray(value)) el.value = value.join(", ");
  else el.value = String(value);
}

function readValue(el, schema) {
  if (el.type === "checkbox") return el.checked;
  const raw = el.value.trim();
  if (schema.type === "array") {
    const items = raw ? raw.split(",").map((x) => x.trim()) : [];
    const itemType = (schema.items || schema.prefixItems?.[0] || {}).type;
    return itemType === "number" || itemType === "integer" ? items.map(Number) : items;
  }
  if (raw === "") return schema.nullable ? null : undefined;
  if (schema.type === "integer" || schema.type === "number") return Number(raw);
  // a number or a word (optimizer.lr: a number or "auto"): a numeric entry is sent as a number
  const numeric = (schema.anyOf || []).some((s) => s.type === "number" || s.type === "integer");
  if (numeric && raw !== "" && Number.isFinite(Number(raw))) return Number(raw);
  return raw;
}

/** Fieldsets for an object schema; leaves are registered in `fields` by their dotted path. */
function fieldsOf(schema, path, fields) {
  return Object.entries(schema.properties || {}).map(([name, raw]) => {
    const sub = resolve(raw);
    const p = [...path, name];
    if (p.join(".") === "dataset_id") return null;
    if (sub.type === "object" || sub.properties) {
      // a nullable section (sweep): off unless switched on
      const toggle = sub.nullable ? h("input", { type: "checkbox", name: `${p.join(".")}.__on` }) : null;
      const set = h("fieldset", { "data-field": p.join(".") },
        h("legend", {}, toggle, " ", title(name, sub)),
        sub.description ? h("p", { class: "muted" }, sub.description.split("\n")[0]) : null,
        fieldsOf(sub, p, fields), h("p", { class: "error" }));
      if (toggle) fields.push({ path: p, schema: sub, el: toggle, section: true });
      return set;
    }
    const el = input(p.join("."), sub);
    fields.push({ path: p, schema: sub, el });
    el.addEventListener("input", () => { el.dataset.dirty = "1"; });
    el.addEventListener("change", () => { el.dataset.dirty = "1"; });
    const limits = [sub.minimum !== undefined && `min ${sub.minimum}`, sub.exclusiveMinimum !== undefined && `> ${sub.exclusiveMinimum}`,
      sub.maximum !== undefined && `max ${sub.maximum}`, sub.exclusiveMaximum !== undefined && `< ${sub.exclusiveMaximum}`]
      .filter(Boolean).join(", ");
    return h("label", { class: "field", "data-field": p.join(".") },
      h("span", {}, title(name, sub)), el,
      sub.description || limits ? h("small", {}, [sub.description, limits && `(${limits})`].filter(Boolean).join(" ")) : null,
      h("span", { class: "error" }));
  });
}

export async function newJobPage(main, datasetId) {
  openapi = openapi || await (await fetch("/openapi.json")).json();
  const schema = resolve(openapi.components.schemas.JobCreate);
  const [{ data: presets }, { data: datasets }] = await Promise.all([api("/v1/presets"), api("/v1/datasets")]);
  const fields = [];
  const advanced = fieldsOf(schema, [], fields);
  let preset = presets[0];

  const datasetSelect = h("select", { name: "dataset_id" },
    datasets.map((d) => h("option", { value: d.id, selected: d.id === datasetId }, `${d.name} (${d.num_images} images)`)));
  const error = h("p", { class: "error", "data-testid": "form-error" });
  const cards = presets.map((p) => {
    const card = h("div", { class: "preset", "data-preset": p.name, tabindex: 0 },
      h("strong", {}, p.title), h("p", { class: "muted" }, p.description));
    card.addEventListener("click", () => choose(p));
    return card;
  });

  function choose(p) {
    preset = p;
    for (const c of cards) c.classList.toggle("chosen", c.dataset.preset === p.name);
    for (const f of fields) {
      const v = get(p.job, f.path);
      if (f.section) { f.el.checked = v !== undefined && v !== null; continue; }
      writeValue(f.el, f.schema, v !== undefined ? v : f.schema.default);
      delete f.el.dataset.dirty;
    }
  }

  function body() {
    let job = structuredClone(preset.job);
    const off = fields.filter((f) => f.section && !f.el.checked).map((f) => f.path.join("."));
    for (const f of fields) {
      if (f.section) continue;
      const key = f.path.join(".");
      if (off.some((o) => key.startsWith(`${o}.`))) continue;
      if (!f.el.dataset.dirty) continue; // untouched: the preset's value, or the schema's default
      const v = readValue(f.el, f.schema);
      if (v !== undefined) setPath(job, f.path, v);
    }
    for (const o of off) setPath(job, o.split("."), null);
    for (const f of fields.filter((x) => x.section && x.el.checked)) {
      if (get(job, f.path) == null) setPath(job, f.path, {});
    }
    return { ...job, dataset_id: datasetSelect.value };
  }

  const submit = h("button", { type: "submit" }, "Start training");
  const form = h("form", { class: "job", novalidate: true },
    h("div", { class: "card" }, h("label", { class: "field" }, h("span", {}, "Dataset"), datasetSelect),
      h("h2", {}, "Preset"), h("div", { class: "presets" }, cards)),
    h("details", { class: "card", "data-testid": "advanced" }, h("summary", {}, "Advanced: every field of the job"),
      advanced),
    error, submit);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const el of form.querySelectorAll(".error")) el.textContent = "";
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", json: body() });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      const unplaced = [];
      for (const [field, message] of Object.entries(err.fields || {})) {
        const box = form.querySelector(`[data-field="${CSS.escape(field)}"] > .error`);
        if (box) { box.textContent = message; form.querySelector("details").open = true; }
        else unplaced.push(`${field}: ${message}`);
      }
      error.textContent = Object.keys(err.fields || {}).length ? unplaced.join("; ") || "Check the fields marked below." : err.message;
      submit.disabled = false;
    }
  });
  mount(main, h("h1", {}, "New job"),
    datasets.length ? form : h("p", {}, "Upload a dataset first: ", h("a", { href: "#/datasets" }, "Datasets"), "."));
  choose(preset);
}
