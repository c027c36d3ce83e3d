// Models: the list, and one model's report as tables and pictures, with its top losses.
import { api, imageUrl } from "../api.js";
import { h, mount, num, pct } from "../dom.js";
import { bars, heatmap, trainingCharts } from "../charts.js";
import { thumbnail } from "./datasets.js";

export async function modelsPage(main) {
  const { data } = await api("/v1/models");
  mount(main, h("h1", {}, "Models"), h("div", { class: "card" }, data.length ? h("table", {},
    h("thead", {}, h("tr", {}, ["Model", "Classes", "Val acc", "Members", "Created", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, data.map((m) => h("tr", {},
      h("td", {}, h("a", { href: `#/models/${m.id}` }, m.id)), h("td", {}, m.classes.join(", ")),
      h("td", {}, pct(m.metrics.val_acc)), h("td", {}, m.members.length),
      h("td", {}, new Date(m.created_at).toLocaleString()), h("td", {}, h("a", { href: `#/try/${m.id}` }, "try it"))))))
    : h("p", { class: "muted" }, "No model yet.")));
}

function figure(path, alt) {
  const img = h("img", { alt });
  imageUrl(path).then((url) => { img.src = url; }, () => img.replaceWith(h("p", { class: "muted" }, `${alt}: not available`)));
  return h("div", { class: "figure" }, img);
}

function table(head, rows) {
  return h("table", {}, h("thead", {}, h("tr", {}, head.map((t, i) => h("th", { class: i ? "num" : null }, t)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c, i) => h("td", { class: i ? "num" : null }, c))))));
}

function topLosses(report, datasetId) {
  const wrong = (report.val_predictions || []).filter((p) => p.label !== p.predicted).slice(0, 24);
  if (!report.val_predictions) return h("p", { class: "muted" }, "This model was trained before predictions were kept.");
  if (!wrong.length) return h("p", { class: "muted" }, "No validation image was misclassified.");
  return h("div", { "data-testid": "top-losses" }, wrong.map((p) => h("div", { class: "loss" },
    p.file ? thumbnail(datasetId, p.file, 128) : h("div", { class: "thumb" }),
    h("div", {}, h("strong", {}, p.predicted), ` ${pct(p.confidence)}`),
    h("div", { class: "muted" }, `true: ${p.label} · loss ${num(p.loss, 2)}`))));
}

export async function modelPage(main, id) {
  const [model, report] = await Promise.all([api(`/v1/models/${id}`), api(`/v1/models/${id}/report`)]);
  const ev = report.evaluation;
  const cal = report.calibration;
  const curves = report.curves.flatMap((c) => c.epoch.map((e, i) => ({
    member: c.member + 1, epoch: e + 1, train_loss: c.train_loss[i], val_loss: c.val_loss[i],
    train_acc: c.train_acc[i], val_acc: c.val_acc[i], lr: c.lr[i] })));
  const cmp = report.comparison || {};
  const comparison = [
    ...(cmp.runs || []).flatMap((r) => [
      { label: `run ${r.member + 1} raw`, value: r.raw_best_val_acc },
      r.ema_best_val_acc !== null && r.ema_best_val_acc !== undefined ? { label: `run ${r.member + 1} EMA`, value: r.ema_best_val_acc } : null]),
    cmp.ensemble_all_val_acc !== null && cmp.ensemble_all_val_acc !== undefined && (cmp.runs || []).length > 1
      ? { label: "all members", value: cmp.ensemble_all_val_acc } : null,
    { label: "served ensemble", value: cmp.ensemble_val_acc ?? report.val_acc },
  ].filter(Boolean).map((x) => ({ ...x, text: pct(x.value) }));

  mount(main,
    h("h1", {}, `Model ${id}`),
    h("p", {}, h("a", { class: "button", href: `#/try/${id}` }, "Try it"), " ",
      h("span", { class: "muted" }, `from job `), h("a", { href: `#/jobs/${model.job_id}` }, model.job_id)),
    h("div", { class: "card row" },
      h("div", {}, h("h2", {}, "Summary"), table(["", ""], [
        ["validation accuracy", h("strong", { "data-testid": "val-acc" }, pct(report.val_acc))],
        ["validation loss", num(report.val_loss)],
        ...Object.entries(ev.top_k_acc).map(([k, v]) => [`top-${k} accuracy`, pct(v)]),
        ["train / val images", `${report.train_size} / ${report.val_size}`],
        ["image size", `${report.image_size} px`], ["members", report.members.map((m) => m.backbone).join(", ")],
        ["temperature", num(report.temperature, 3)], ["trained in", `${num(report.seconds, 1)} s on ${report.device}`]])),
      h("div", {}, h("h2", {}, "Raw, EMA and ensemble"), bars(comparison))),
    h("div", { class: "card" }, h("h2", {}, "Per class"), table(["class", "precision", "recall", "F1", "support"],
      [...ev.per_class.map((c) => [c.label, pct(c.precision), pct(c.recall), pct(c.f1), c.support]),
        ["macro average", pct(ev.macro_avg.precision), pct(ev.macro_avg.recall), pct(ev.macro_avg.f1), ev.size]])),
    h("div", { class: "card row" }, h("div", {}, h("h2", {}, "Confusion matrix"), heatmap(ev.confusion, report.classes)),
      h("div", {}, h("h2", {}, "Calibration"), table(["", "ECE", "NLL"], [
        ["before temperature scaling", num(cal.before.ece), num(cal.before.nll)],
        [`after (T = ${num(cal.temperature, 2)})`, num(cal.after.ece), num(cal.after.nll)]]),
        figure(report.figures.reliability, "reliability diagrams"))),
    h("div", { class: "card" }, h("h2", {}, "Training curves"), trainingCharts(curves)),
    h("div", { class: "card" }, h("h2", {}, "Top losses"),
      h("p", { class: "muted" }, "Validation images the model got wrong, the most confidently wrong first: predicted class and its probability, then the true class."),
      topLosses(report, model.dataset_id)),
    h("details", { class: "card" }, h("summary", {}, "Report figures (PNG)"),
      figure(report.figures.curves, "training curves"), figure(report.figures.confusion, "confusion matrix")));
}
