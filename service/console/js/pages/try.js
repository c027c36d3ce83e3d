// Try a model: drop images, see each one's top-k classes as bars (with a TTA switch).
import { api } from "../api.js";
import { dropZone, h, mount, pct } from "../dom.js";
import { bars } from "../charts.js";

export async function tryPage(main, id) {
  const model = await api(`/v1/models/${id}`);
  const tta = h("select", { name: "tta" }, ["none", "hflip", "five_crop"].map((m) => h("option", { value: m }, m)));
  const topK = h("input", { type: "number", name: "top_k", min: 1, max: model.classes.length, value: Math.min(5, model.classes.length) });
  const results = h("div", { "data-testid": "predictions" });
  const error = h("p", { class: "error" });

  async function predict(files) {
    error.textContent = "";
    const form = new FormData();
    for (const f of files) form.append("files", f);
    mount(results, h("p", { class: "muted" }, "Predicting…"));
    try {
      const out = await api(`/v1/models/${id}/predict?top_k=${topK.value}&tta=${tta.value}`, { method: "POST", body: form });
      mount(results, out.predictions.map((p, i) => {
        const img = h("img", { class: "thumb", alt: p.file });
        img.src = URL.createObjectURL(files[i]);
        return h("div", { class: "card row" }, h("div", {}, img, h("p", {}, p.file)),
          bars(p.top_k.map((t) => ({ label: t.label, value: t.probability, text: pct(t.probability) }))));
      }));
    } catch (err) {
      mount(results);
      error.textContent = err.message;
    }
  }

  mount(main,
    h("h1", {}, "Try model ", h("a", { href: `#/models/${id}` }, id)),
    h("p", { class: "muted" }, `classes: ${model.classes.join(", ")}`),
    h("div", { class: "card" },
      h("label", {}, "Test-time augmentation ", tta), "  ", h("label", {}, "top-k ", topK),
      dropZone({ label: "Drop one or more images here, or pick them:", accept: "image/*", multiple: true,
        onFiles: predict, testid: "predict-files" }), error),
    results);
}
