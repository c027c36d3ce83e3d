// Models: the list, and one model's report as tables and pictures, with its top losses and, for a job
// with a time budget, what the planner chose and why.
import { api, imageUrl } from "../api.js";
import { duration, h, mount, num, pct } from "../dom.js";
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

// The time-budget plan (report.plan): the planner's choices in words, its reasons, the speeds it measured.
const FIELD_WORDS = {
  backbone: "backbone", image_size: "image size", freeze: "what trains", epochs: "epochs",
  patience: "early-stopping patience", "ensemble.members": "members", augment: "augmentation",
  head_dropout: "head dropout", "schedule.name": "lr schedule", "schedule.warmup_epochs": "warm-up epochs",
  "optimizer.lr": "learning rate", head_features: "head features", weights: "weights",
};
const DEPTH_WORDS = { linear_probe: "head only", top: "top stage + head", most: "most of it", all: "everything" };

const seconds = (x) => (x === null || x === undefined ? "–" : x >= 120 ? duration(x) : `${num(x, x < 10 ? 1 : 0)} s`);
const lrText = (x) => (typeof x === "number" ? String(Number(x.toPrecision(2))) : x ?? "–");
const imgPerS = (x) => (!x ? "–" : x >= 10 ? Math.round(x).toLocaleString("en-US") : num(x, 1));
const at = (obj, path) => path.split(".").reduce((o, k) => (o === null || o === undefined ? undefined : o[k]), obj);

function freezeText(f) {
  const mult = f.backbone_lr_mult !== undefined && f.backbone_lr_mult !== 1 ? `, backbone lr × ${f.backbone_lr_mult}` : "";
  if (f.mode === "linear_probe") return "the classifier only (linear probe)";
  if (f.mode === "none") return `the whole network${mult}`;
  if (f.mode === "first_n") return `all but the first ${f.stages} groups${mult}`;
  return Object.entries(f).map(([k, v]) => `${k} ${v}`).join(", ");
}

function fieldText(path, value) {
  if (value === undefined) return "–";
  if (value === null) return "none";
  if (path === "image_size") return `${value} px`;
  if (path === "freeze" && value && typeof value === "object") return freezeText(value);
  if (path === "augment" && value && typeof value === "object" && value.preset) return value.preset;
  if (path === "optimizer.lr") return value === "auto" ? "auto (learning-rate range test)" : lrText(value);
  if (path === "head_features") return { last: "last stage", multi_stage: "several stages joined" }[value] || String(value);
  if (value && typeof value === "object") return Object.entries(value).map(([k, v]) => `${k} ${v}`).join(", ");
  return String(value);
}

/** Which measured row the plan trains: its size, backbone and frozen depth. */
function plannedRow(plan) {
  const spec = plan.spec || {};
  const f = spec.freeze || {};
  return (plan.throughputs || []).findIndex((t) => t.size === spec.image_size
    && (!t.backbone || t.backbone === spec.backbone)
    && (f.mode === "linear_probe" ? t.depth === "linear_probe" : f.mode === "none" ? t.depth === "all"
      : ["top", "most"].includes(t.depth) && t.frozen_groups === f.stages));
}

function throughputTable(plan) {
  const rows = plan.throughputs || [];
  const backbones = rows.some((t) => t.backbone) && new Set(rows.map((t) => t.backbone)).size > 1;
  const chosen = plannedRow(plan);
  const head = ["size", "what trains · groups frozen", ...(backbones ? ["backbone"] : []), "train img/s", "prefix img/s"];
  return h("table", { class: "speeds", "data-testid": "plan-throughputs" },
    h("thead", {}, h("tr", {}, head.map((t, i) => h("th", { class: i >= head.length - 2 ? "num" : null }, t)))),
    h("tbody", {}, rows.map((t, i) => h("tr", i === chosen ? { class: "chosen", title: "the plan trains this" } : {},
      h("td", {}, `${t.size} px`),
      h("td", {}, DEPTH_WORDS[t.depth] || t.depth,
        t.frozen_groups && t.depth !== "all" ? h("span", { class: "muted" }, ` · ${t.frozen_groups} frozen`) : null),
      backbones ? h("td", {}, t.backbone || "–") : null,
      h("td", { class: "num" }, imgPerS(t.train_img_s)),
      h("td", { class: "num" }, t.cached ? imgPerS(t.prefix_img_s) : "–")))));
}

function lrFinder(report) {
  const lf = report.lr_finder;
  if (!lf) return null;
  return h("div", { "data-testid": "lr-finder" }, h("h3", {}, "Learning rate"),
    h("p", {}, "The range test picked ", h("strong", { "data-testid": "lr-picked" }, lrText(lf.lr)), `: ${lf.method}.`),
    h("p", { class: "muted" }, `Steepest fall at ${lrText(lf.lr_steepest)}, minimum / 10 at ${lrText(lf.lr_min_div10)}; `
      + `${lf.iterations} steps in ${num(lf.seconds, lf.seconds < 1 ? 2 : 1)} s`
      + `${lf.stopped && lf.stopped !== `${lf.iterations} steps` ? ` (${lf.stopped})` : ""}.`),
    report.figures.lr_finder ? figure(report.figures.lr_finder, "learning-rate range test") : null);
}

/** A two-column table of [label, value, row attributes] (the label's title: the field's path). */
function pairs(testid, rows) {
  return h("table", { class: "pairs", "data-testid": testid }, h("tbody", {},
    rows.map(([label, value, attrs]) => h("tr", attrs || {}, h("td", { class: "muted" }, label), h("td", {}, value)))));
}

function planCard(report) {
  const plan = report.plan;
  const planned = Object.entries(plan.planned || {});
  const kept = (plan.kept || []).filter((k) => !(k in (plan.planned || {})));
  const notes = [
    ["plan-deadline", "Deadline", (plan.deadline || report.deadline || {}).note],
    ["plan-members-shortened", "Members shortened", (plan.members_shortened || report.members_shortened || {}).note],
    ["plan-members-skipped", "Members skipped", (plan.members_skipped || report.members_skipped || {}).note],
  ].filter(([, , note]) => note);
  return h("div", { class: "card", "data-testid": "plan" },
    h("h2", {}, "Plan"),
    h("p", { class: "muted" }, "The job had a time budget: zoofit measured this device's speed with the job's images, "
      + "then chose the recipe that fits it. Fields you set were kept as given."),
    h("div", { class: "row" },
      h("div", {}, pairs("plan-time", [
        ["budget", h("span", { "data-testid": "plan-budget" }, h("strong", {}, seconds(plan.budget_s)),
          plan.default_budget ? h("span", { class: "muted" }, " · the default budget for this device") : null)],
        ["device", plan.device],
        ["estimated", h("span", { "data-testid": "plan-estimate" }, seconds(plan.estimate_seconds),
          h("span", { class: "muted" }, ` · measuring the speed took ${seconds(plan.measure_seconds)}`))],
        ["took", h("span", { "data-testid": "plan-seconds" }, seconds(plan.seconds), typeof plan.seconds === "number"
          ? h("span", { class: "muted" }, ` · ${Math.round((100 * plan.seconds) / plan.budget_s)}% of the budget`) : null)]])),
      h("div", {}, pairs("plan-fields", [
        ...planned.map(([k, v]) => [FIELD_WORDS[k] || k, fieldText(k, v), { "data-field": k, title: k }]),
        ...kept.map((k) => [FIELD_WORDS[k] || k,
          [fieldText(k, at(plan.spec, k)), " ", h("span", { class: "tag" }, "you set")], { "data-field": k, title: k }])]))),
    h("h3", {}, "Why"),
    h("ul", { class: "why", "data-testid": "plan-why" }, (plan.why || []).map((line) => h("li", {}, line))),
    notes.map(([testid, title, note]) => h("p", { class: "note", "data-testid": testid },
      h("strong", {}, `${title}: `), note)),
    h("div", { class: "row" },
      h("div", {}, h("h3", {}, "Measured speed"),
        h("p", { class: "muted" }, `Images per second on ${plan.device}, at each size and frozen depth; the prefix is the `
          + "frozen part, computed once and cached. The row in bold is what the plan trains."),
        throughputTable(plan)),
      lrFinder(report)));
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
    report.plan ? planCard(report)
      : report.lr_finder ? h("div", { class: "card", "data-testid": "lr-finder-card" }, lrFinder(report)) : null,
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
