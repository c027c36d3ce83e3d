// Every call to the API: the bearer key, problem+json errors, uploads with progress, images as blob URLs.
const KEY = "zoofit.apiKey";

export const auth = {
  get key() { return sessionStorage.getItem(KEY); },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
  headers() { const k = this.key; return k ? { Authorization: `Bearer ${k}` } : {}; },
};

/** An error answer: `detail` (one line) and, for a 422, the message of each named field ("optimizer.lr"). */
export class ApiError extends Error {
  constructor(status, body) {
    const fields = {};
    // The problem+json shape: errors[].field / message.
    for (const e of body?.errors || []) fields[e.field] = e.message;
    // FastAPI's default 422 until that lands everywhere: detail[] with loc ["body", "optimizer", "lr"].
    if (Array.isArray(body?.detail)) {
      for (const e of body.detail) {
        const loc = (e.loc || []).slice(e.loc?.[0] === "body" ? 1 : 0);
        if (loc.length) fields[loc.join(".")] = e.msg;
      }
    }
    const detail = typeof body?.detail === "string" ? body.detail
      : Object.entries(fields).map(([f, m]) => `${f}: ${m}`).join("; ") || body?.title || `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.fields = fields;
  }
}

let onUnauthorized = () => {};
export function whenUnauthorized(fn) { onUnauthorized = fn; }

/** The ApiError of an error answer; a 401 also tells the shell (back to the sign-in form). */
export async function errorOf(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  if (res.status === 401) onUnauthorized();
  return new ApiError(res.status, body);
}

/** fetch() with the key; JSON in and out. `raw: true` gives the Response itself. */
export async function api(path, { method = "GET", json, body, headers = {}, raw = false, signal } = {}) {
  const init = { method, headers: { ...auth.headers(), ...headers }, signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) init.body = body;
  const res = await fetch(path, init);
  if (!res.ok) throw await errorOf(res);
  if (raw) return res;
  return res.status === 204 ? null : res.json();
}

/** POST a FormData with XMLHttpRequest, for its upload progress events: onProgress(fraction). */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(auth.headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(0, { detail: "the upload failed (network error)" }));
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        if (xhr.status === 401) onUnauthorized();
        reject(new ApiError(xhr.status, body));
      }
    };
    xhr.send(form);
  });
}

const blobs = new Map();

/** An image route fetched with the key, as a blob: URL (<img src> cannot send the header). Cached per page load. */
export function imageUrl(path) {
  if (!blobs.has(path)) {
    const p = api(path, { raw: true }).then((r) => r.blob()).then((b) => URL.createObjectURL(b));
    p.catch(() => blobs.delete(path));
    blobs.set(path, p);
  }
  return blobs.get(path);
}

/** Does the API want a key? GET /v1/datasets answers 200 without one when auth is off. */
export async function authRequired() {
  const res = await fetch("/v1/datasets?limit=1", { headers: auth.headers() });
  return res.status === 401;
}
