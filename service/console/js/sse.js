// The job event stream read with fetch(): EventSource cannot send the Authorization header.
import { ApiError, auth, errorOf } from "./api.js";

/**
 * Follow a server-sent event stream until its `done` event or stop().
 * onEvent(type, data, id) gets each event (data parsed as JSON); on a dropped connection it
 * reconnects after a pause, sending Last-Event-ID so that only later events come.
 * onFatal(error) gets an error answer (4xx), after which it stops; a 401 goes to the shell instead
 * (the sign-in form), and a 429 (too many streams) or 5xx is retried with backoff.
 */
export function followEvents(path, { onEvent, onFatal, onState = () => {} }) {
  const abort = new AbortController();
  let lastId = null;
  let finished = false;
  let delay = 1000;

  function dispatch(ev) {
    if (ev.id !== undefined) lastId = ev.id;
    if (!ev.data.length) return;
    let data = null;
    try { data = JSON.parse(ev.data.join("\n")); } catch { data = ev.data.join("\n"); }
    const type = ev.event || "message";
    if (type === "done") finished = true;
    onEvent(type, data, ev.id);
  }

  async function once() {
    const headers = { ...auth.headers(), Accept: "text/event-stream" };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    const res = await fetch(path, { headers, signal: abort.signal });
    if (!res.ok) throw await errorOf(res);
    onState("live");
    delay = 1000;
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    let ev = { data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let nl;
      // A lone "\r" at the end of a chunk may be half of "\r\n": wait for the next chunk.
      while ((nl = buf.search(/\r\n|\n|\r(?=[^\n])/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf.startsWith("\r\n", nl) ? 2 : 1));
        if (line === "") { dispatch(ev); ev = { data: [] }; continue; }
        if (line.startsWith(":")) continue; // a comment (": ping")
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") ev.data.push(val);
        else if (field === "event") ev.event = val;
        else if (field === "id") ev.id = val;
      }
    }
  }

  (async () => {
    while (!finished && !abort.signal.aborted) {
      try {
        await once();
      } catch (err) {
        if (abort.signal.aborted) return;
        if (err instanceof ApiError && err.status === 401) return;  // errorOf showed the sign-in form
        if (err instanceof ApiError && err.status >= 400 && err.status < 500 && err.status !== 429) {
          onFatal(err);
          return;
        }
      }
      if (finished || abort.signal.aborted) return;
      onState("reconnecting");
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 15000);
    }
  })();
  return { stop: () => abort.abort() };
}
