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
  const grid = samples.data.map((c) => h("div", {},
    h("h2", {}, `${c.label} `, h("span", { class: "muted" }, `(${c.count})`)),
    h("div", { class: "thumbs" }, c.files.map((f) => thumbnail(id, f, 96)))));
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

/** One stored image of a dataset as a thumbnail; a grey placeholder if it cannot be had (dataset deleted). */
export function thumbnail(datasetId, file, size, alt = file) {
  const img = h("img", { alt, title: file, class: "thumb" });
  const path = `/v1/datasets/${datasetId}/thumbnails/${file.split("/").map(encodeURIComponent).join("/")}?size=${size}`;
  imageUrl(path).then((url) => { img.src = url; }, () => {
    img.replaceWith(h("div", { class: "thumb", title: `${file} (not available)` }));
  });
  return img;
}
