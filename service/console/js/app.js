// The console's shell: sign-in, navigation and hash routes (#/datasets, #/jobs/ID, #/models/ID, #/try/ID).
import { api, auth, authRequired, whenUnauthorized } from "./api.js";
import { h, mount } from "./dom.js";
import { datasetPage, datasetsPage } from "./pages/datasets.js";
import { jobPage, jobsPage } from "./pages/job.js";
import { modelPage, modelsPage } from "./pages/model.js";
import { newJobPage } from "./pages/newjob.js";
import { tryPage } from "./pages/try.js";

const main = document.getElementById("main");
const signout = document.getElementById("signout");
let needsKey = false;
let leave = null; // the current page's cleanup (an open event stream)
let signingIn = false; // a key being tried: its 401 is the sign-in form's to show
let shown = 0; // counts route() calls: a page that finishes loading after another route() began is not shown

const ROUTES = [
  [/^#\/datasets\/([^/]+)$/, datasetPage],
  [/^#\/datasets$/, datasetsPage],
  [/^#\/new(?:\/([^/]+))?$/, newJobPage],
  [/^#\/jobs\/([^/]+)$/, jobPage],
  [/^#\/jobs$/, jobsPage],
  [/^#\/models\/([^/]+)$/, modelPage],
  [/^#\/models$/, modelsPage],
  [/^#\/try\/([^/]+)$/, tryPage],
];

function signInPage() {
  const input = h("input", { type: "password", name: "key", placeholder: "zf_…", autocomplete: "off", size: 48 });
  const error = h("p", { class: "error" });
  const form = h("form", { class: "card", "data-testid": "signin" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste an API key (", h("code", {}, "zoofit keys create"),
      "). It is kept in this tab only (sessionStorage) and sent as a bearer token."),
    input, " ", h("button", { type: "submit" }, "Sign in"), error);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    auth.set(input.value.trim());
    signingIn = true;
    try {
      await api("/v1/datasets?limit=1");
      signingIn = false;
      location.hash = "#/datasets";
      route();
    } catch (err) {
      signingIn = false;
      auth.clear();
      error.textContent = err.status === 401 ? "That key is not valid." : err.message;
    }
  });
  return form;
}

async function route() {
  const mine = ++shown;
  if (leave) { leave(); leave = null; }
  signout.hidden = !(needsKey && auth.key);
  if (needsKey && !auth.key) { mount(main, signInPage()); return; }
  const hash = location.hash || "#/datasets";
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", hash.startsWith(a.getAttribute("href")));
  }
  for (const [re, page] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    mount(main, h("p", { class: "muted" }, "Loading…"));
    let cleanup = null;
    try {
      cleanup = (await page(main, ...m.slice(1))) || null;
    } catch (err) {
      // A 401 has shown the sign-in form already (whenUnauthorized), and a page replaced
      // meanwhile is not this one's to cover.
      if (mine === shown && err.status !== 401) {
        mount(main, h("div", { class: "card" }, h("h1", {}, "Something went wrong"), h("p", { class: "error" }, err.message)));
      }
      return;
    }
    if (mine === shown) leave = cleanup;
    else if (cleanup) cleanup();  // another route() took over while this page loaded
    return;
  }
  location.hash = "#/datasets";
}

// Any 401 (a key revoked meanwhile, or the API wanted a key though the probe at load could not
// tell, e.g. it answered 503): back to the sign-in form.
whenUnauthorized(() => {
  if (signingIn) return;
  needsKey = true;
  auth.clear();
  route();
});
signout.addEventListener("click", () => { auth.clear(); location.hash = "#/datasets"; route(); });
window.addEventListener("hashchange", route);

(async () => {
  needsKey = auth.key ? true : await authRequired();
  route();
})();
