// Datasets: upload (drag and drop or a picker, with progress), list, class counts, thumbnails, skipped files, delete.
import { api, imageUrl, upload } from "../api.js";
import { bar, dropZone, h, mount } from "../dom.js";
import { bars } from "../charts.js";

export async function datasetsPage(main) {
  const status = h("p", { class: "muted" });
  const progress = bar(0);
  progress.hidden = true;
  const list = h("div");

  async function send(files) {
    const file = files[0];
    const form = new FormData();
    form.append("file", file);
    progress.hidden = false;
    status.className = "muted";
    status.textContent = `Uploading ${file.name}…`;
    try {
      const ds = await upload("/v1/datasets?on_bad_file=skip", form, (f) => {
        progress.firstChild.style.width = `${f * 100}%`;
        if (f >= 1) status.textContent = "Checking the images…";
      });
      location.hash = `#/datasets/${ds.id}`;
    } catch (err) {
      status.className = "error";
      status.textContent = err.message;
      progress.hidden = true;
    }
  }

  async function refresh() {
    const { data } = await api("/v1/datasets");
    mount(list, data.length ? h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", { class: "num" }, "Classes"),
        h("th", { class: "num" }, "Images"), h("th", {}, "Uploaded"))),
      h("tbody", {}, data.map((d) => h("tr", {},
        h("td", {}, h("a", { href: `#/datasets/${d.id}` }, d.name)),
        h("td", { class: "num" }, d.classes.length), h("td", { class: "num" }, d.num_images),
        h("td", {}, new Date(d.created_at).toLocaleString())))))
      : h("p", { class: "muted" }, "No dataset yet."));
  }

  mount(main,
    h("h1", {}, "Datasets"),
    h("div", { class: "card" },
      dropZone({ label: "Drop a .zip, .tar or .tar.gz of <class>/<image> folders here, or pick one:",
        accept: ".zip,.tar,.gz,.tgz", onFiles: send, testid: "dataset-file" }),
      progress, status),
    h("div", { class: "card" }, list));
  await refresh();
}

export async function datasetPage(main, id) {
  const ds = await api(`/v1/datasets/${id}`);
  const samples = await api(`/v1/datasets/${id}/samples?per_class=8`);
  const most = Math.max(...Object.values(ds.counts), 1);
  const error = h("p", { class: "error" });
  const del = h("button", { class: "danger", type: "button" }, "Delete dataset");
  del.addEventListener("click", async () => {
    if (!confirm(`Delete dataset ${ds.name} and its files?`)) return;
    try {
      await api(`/v1/datasets/${id}`, { method: "DELETE" });
      location.hash = "#/datasets";
    } catch (err) { error.textContent = err.message; }
  });
  // The first classes only until asked: a 1000-class dataset is a long page (its thumbnails load
  // as they scroll into view anyway, see thumbnail()).
  const classSamples = (c) => h("div", {},
    h("h2", {}, `${c.label} `, h("span", { class: "muted" }, `(${c.count})`)),
    h("div", { class: "thumbs" }, c.files.map((f) => thumbnail(id, f, 96))));
  const grid = h("div", { "data-testid": "samples" }, samples.data.slice(0, CLASSES_SHOWN).map(classSamples));
  if (samples.data.length > CLASSES_SHOWN) {
    const more = h("button", { type: "button", "data-testid": "show-all-classes" },
      `Show all ${samples.data.length} classes`);
    more.addEventListener("click", () => {
      more.remove();
      grid.append(...samples.data.slice(CLASSES_SHOWN).map(classSamples));
    });
    grid.append(more);
  }
  mount(main,
    h("h1", {}, ds.name, " ", h("span", { class: "muted" }, `${ds.num_images} images, ${ds.classes.length} classes`)),
    h("p", {}, h("a", { class: "button", href: `#/new/${id}` }, "Train a model on it"), " ", del, error),
    h("div", { class: "card" }, h("h2", {}, "Images per class"),
      bars(ds.classes.map((c) => ({ label: c, value: ds.counts[c] / most, text: String(ds.counts[c]) })),
        { testid: "class-counts" })),
    h("div", { class: "card" }, h("h2", {}, "Samples"), grid),
    h("div", { class: "card" }, h("h2", {}, `Skipped files (${ds.skipped.length})`),
      ds.skipped.length ? h("table", {}, h("tbody", {}, ds.skipped.map((sk) =>
        h("tr", {}, h("td", {}, h("code", {}, sk.file)), h("td", {}, sk.reason)))))
        : h("p", { class: "muted" }, "None: every file was a usable image.")));
}

// Classes whose samples the dataset page shows before "Show all".
const CLASSES_SHOWN = 24;
// Thumbnails fetched at once (each is a request with the key, as a blob: <img loading="lazy">
// cannot send the header); the others wait until one is done, and until they scroll into view.
const LOADS_AT_ONCE = 4;
let loading = 0;
const waiting = [];

function pump() {
  while (loading < LOADS_AT_ONCE && waiting.length) {
    const load = waiting.shift();
    loading += 1;
    load().finally(() => { loading -= 1; pump(); });
  }
}

const inView = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (!e.isIntersecting) continue;
    inView.unobserve(e.target);
    waiting.push(e.target.zoofitLoad);
    pump();
  }
}, { rootMargin: "200px" });

/** One stored image of a dataset as a thumbnail, fetched once it nears the viewport; a grey placeholder if it cannot be had. */
export function thumbnail(datasetId, file, size, alt = file) {
  const img = h("img", { alt, title: file, class: "thumb" });
  const path = `/v1/datasets/${datasetId}/thumbnails/${file.split("/").map(encodeURIComponent).join("/")}?size=${size}`;
  img.zoofitLoad = async (tries = 0) => {
    try {
      img.src = await imageUrl(path);
    } catch (err) {
      if (err.status === 503 && tries < 5) {  // the server's thumbnail slots are busy: Retry-After 1
        await new Promise((r) => setTimeout(r, 1000 * (tries + 1)));
        return img.zoofitLoad(tries + 1);
      }
      img.replaceWith(h("div", { class: "thumb", title: `${file} (not available)` }));
    }
  };
  inView.observe(img);
  return img;
}
