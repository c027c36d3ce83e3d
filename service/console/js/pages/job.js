// Jobs: the list, and one job live from its event stream (progress, curves, sweep trials, ETA, cancel).
import { api } from "../api.js";
import { bar, duration, h, mount, num, pct, statusBadge } from "../dom.js";
import { trainingCharts } from "../charts.js";
import { followEvents } from "../sse.js";

const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

export async function jobsPage(main) {
  const { data } = await api("/v1/jobs");
  mount(main, h("h1", {}, "Jobs"), h("div", { class: "card" }, data.length ? h("table", {},
    h("thead", {}, h("tr", {}, ["Job", "Status", "Backbone", "Val acc", "Model", "Created"].map((t) => h("th", {}, t)))),
    h("tbody", {}, data.map((j) => h("tr", {},
      h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id)), h("td", {}, statusBadge(j.status)),
      h("td", {}, j.spec.backbone), h("td", {}, pct(j.metrics?.val_acc)),
      h("td", {}, j.model_id ? h("a", { href: `#/models/${j.model_id}` }, j.model_id) : "–"),
      h("td", {}, new Date(j.created_at).toLocaleString())))))
    : h("p", { class: "muted" }, "No job yet: ", h("a", { href: "#/new" }, "start one"), ".")));
}

/** Seconds per epoch from the live epoch events' arrival times (a replay arrives in one burst: skipped). */
class EtaClock {
  constructor() { this.last = null; this.gaps = []; }
  tick() {
    const now = performance.now();
    if (this.last !== null && now - this.last > 150) this.gaps.push((now - this.last) / 1000);
    this.last = now;
  }
  remaining(p) {
    if (!this.gaps.length || !p.epochs) return null;
    const recent = this.gaps.slice(-5);
    const perEpoch = recent.reduce((a, b) => a + b, 0) / recent.length;
    const left = perEpoch * ((p.members - p.member) * p.epochs + (p.epochs - p.epoch));
    // A time budget's plan names up to 5 members and trains those that fit: never past its end.
    const ends = p.plan && p.plan.ends_at ? (Date.parse(p.plan.ends_at) - Date.now()) / 1000 : NaN;
    return Number.isFinite(ends) ? Math.max(0, Math.min(left, ends)) : left;
  }
}

export async function jobPage(main, id) {
  const job = await api(`/v1/jobs/${id}`);
  const state = {
    status: job.status, error: job.error, modelId: job.model_id, stage: job.progress.stage || "",
    progress: { ...job.progress }, epochs: [], trials: [], stream: "connecting",
  };
  const eta = new EtaClock();
  const view = {
    status: h("span", { "data-testid": "job-status" }), stage: h("span", { class: "muted" }),
    stream: h("span", { class: "muted" }), progress: h("div", { class: "progress" }), charts: h("div"),
    trials: h("div"), outcome: h("div"),
  };
  const cancel = h("button", { class: "danger", type: "button" }, "Cancel job");
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try { const j = await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); state.status = j.status; render(); }
    catch (err) { view.outcome.textContent = err.message; cancel.disabled = false; }
  });

  function render() {
    mount(view.status, statusBadge(state.status));
    view.stage.textContent = state.stage ? ` ${state.stage}` : "";
    // "live" only while there is more to come: a finished job's stream has ended.
    view.stream.textContent = FINISHED.has(state.status) ? ""
      : { live: "live", reconnecting: "reconnecting…", connecting: "" }[state.stream] || "";
    cancel.hidden = FINISHED.has(state.status);
    const p = state.progress;
    const rows = [];
    if (p.members) rows.push(["members", (p.member - 1 + (p.epoch || 0) / (p.epochs || 1)) / p.members, `${p.member} / ${p.members}`]);
    if (p.epochs) rows.push(["epoch", p.epoch / p.epochs, `${p.epoch} / ${p.epochs}`]);
    const left = FINISHED.has(state.status) ? null : eta.remaining(p);
    mount(view.progress, rows.map(([label, f, text]) => [h("span", {}, label), bar(f), h("span", { class: "num" }, text)]),
      left !== null ? [h("span", {}, "ETA"), h("span", { "data-testid": "eta" }, `about ${duration(left)}`), h("span")] : null);
    mount(view.charts, state.epochs.length ? trainingCharts(state.epochs) : h("p", { class: "muted" }, "No epoch finished yet."));
    view.trials.parentElement && (view.trials.parentElement.hidden = !state.trials.length);
    mount(view.trials, state.trials.length ? [h("h2", {}, "Sweep trials"), h("table", {},
      h("thead", {}, h("tr", {}, ["round", "rung", "trial", "epochs", "lr", "weight decay", "val acc", "outcome"].map((t) => h("th", {}, t)))),
      h("tbody", {}, state.trials.map((t) => h("tr", {}, h("td", {}, t.round + 1), h("td", {}, t.rung + 1),
        h("td", {}, t.trial + 1), h("td", {}, t.epochs), h("td", {}, num(t.lr, 5)), h("td", {}, num(t.weight_decay, 6)),
        h("td", {}, pct(t.val_acc)), h("td", {}, t.outcome || t.status)))))] : null);
    mount(view.outcome,
      state.status === "succeeded" && state.modelId ? h("p", {}, "Finished: ",
        h("a", { href: `#/models/${state.modelId}`, "data-testid": "model-link" }, `model ${state.modelId}`), " · ",
        h("a", { href: `#/try/${state.modelId}` }, "try it")) : null,
      state.error ? h("p", { class: "error" }, state.error) : null);
  }

  const epochRecord = (r) => ({ ...r }); // event records are 1-based already

  function onEvent(type, data) {
    if (type === "status") Object.assign(state, { status: data.status, error: data.error, modelId: data.model_id });
    else if (type === "stage") { state.stage = data.stage; state.progress = { ...state.progress, ...data }; }
    else if (type === "epoch") {
      eta.tick();
      state.stage = "training";
      state.progress = { ...state.progress, ...data };
      state.epochs = [...state.epochs.filter((r) => !(r.member === data.member && r.epoch === data.epoch)), epochRecord(data)];
    } else if (type === "trial") {
      // One row per trial: a worker that takes the job over during the sweep runs it again.
      const same = (t) => t.round === data.round && t.rung === data.rung && t.trial === data.trial;
      state.trials = [...state.trials.filter((t) => !same(t)), data];
    }
    else if (type === "restart") {
      state.epochs = (data.history || []).map(epochRecord);
      eta.gaps = [];
    } else if (type === "done") {
      Object.assign(state, { status: data.status, error: data.error, modelId: data.model_id });
      // A job from before event streams has no trial events: its progress still lists them.
      if (!state.trials.length) state.trials = [...(job.progress.sweep?.trials || [])];
    }
    render();
  }

  // The stream replays the job from its first event (trials and epochs included): state.epochs and
  // state.trials start empty, not from job.progress, or each would show twice.
  const stream = followEvents(`/v1/jobs/${id}/events`, {
    onEvent,
    onState: (s) => { state.stream = s; render(); },
    onFatal: (err) => {
      state.error = err.message;
      render();
    },
  });
  mount(main,
    h("h1", {}, `Job ${id} `, view.status, view.stage, " ", view.stream),
    h("p", { class: "muted" }, `dataset `, h("a", { href: `#/datasets/${job.dataset_id}` }, job.dataset_id),
      ` · ${job.spec.backbone} · ${job.spec.ensemble?.members ?? 1} member(s) · ${job.spec.epochs} epochs`),
    h("div", { class: "card" }, view.progress, view.outcome, cancel),
    h("div", { class: "card" }, h("h2", {}, "Curves"), view.charts),
    h("div", { class: "card" }, view.trials));
  render();
  return () => { stream.stop(); };
}
