// gracevlm chat: a small client of this server's own OpenAI-compatible API (no framework, no build step).
//
// * GET /v1/models names the model; POST /v1/chat/completions with stream: true is read with fetch and a
//   ReadableStream, parsed as server-sent events ("data: {...}" blocks, "data: [DONE]" at the end).
// * The whole conversation is sent each turn; an image stays in the user turn it was attached to, as a
//   data: URL (scaled down with a canvas when its longest side is above the "Largest image side" setting).
// * An API key is asked for when the server answers 401, kept in sessionStorage, sent as a Bearer token.
// * Every failure ends as a readable message: HTTP errors use the server's error body; network failures,
//   cut-off streams, and silence longer than the timeout are caught; Stop aborts with an AbortController.
//
// For tests and tools: each rendered delta dispatches a "gracevlm:delta" event on document (detail: the
// answer so far and its length), each finished answer a "gracevlm:answer" event; an answer's list item
// carries data-state (streaming, done, stopped) and data-deltas.
//
// Token probabilities (Settings, off by default): the request asks for logprobs with 5 alternatives, and
// each answer gets a line of its tokens (.msg-tokens .tok, data-p = the probability of the distribution the
// token was sampled from); hovering or focusing a token shows it, its probability and the alternatives in
// #tok-tip.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    modelDot: $("model-dot"), modelName: $("model-name"),
    settingsToggle: $("settings-toggle"), settings: $("settings"), settingsForm: $("settings-form"),
    reset: $("reset"),
    temperature: $("set-temperature"), maxTokens: $("set-max-tokens"), maxSide: $("set-max-side"),
    timeout: $("set-timeout"), keyField: $("set-api-key"), keySave: $("key-save"), keyForget: $("key-forget"),
    error: $("error"), errorText: $("error-text"), errorClose: $("error-close"),
    chat: $("chat"), empty: $("empty"), log: $("log"),
    composer: $("composer"), file: $("file"), fileLabel: $("file-label"), preview: $("preview"),
    previewImg: $("preview-img"), previewInfo: $("preview-info"), previewRemove: $("preview-remove"),
    question: $("question"), send: $("send"), stop: $("stop"), status: $("status"),
    dropOverlay: $("drop-overlay"),
    keyDialog: $("key-dialog"), keyForm: $("key-form"), keyReason: $("key-reason"), keyInput: $("key-input"),
    keyError: $("key-error"), keyCancel: $("key-cancel"),
    probs: $("set-probs"), tokTip: $("tok-tip"),
  };

  const KEY_STORE = "gracevlm.apiKey";
  const SETTINGS_STORE = "gracevlm.settings";
  const SETTINGS = {  // name: [default, min, max, integer]
    temperature: [0, 0, 2, false],
    maxTokens: [512, 1, 32768, true],
    maxSide: [1024, 64, 8192, true],
    timeout: [120, 5, 3600, true],
  };
  const KEEP_TYPES = new Set(["image/jpeg", "image/png", "image/webp", "image/gif"]);
  const MAX_FILE_BYTES = 64 * 2 ** 20;  // refuse to even decode files larger than this

  const state = {
    model: null,          // the served model's id (GET /v1/models)
    history: [],          // the messages of the finished turns, as sent to the API
    image: null,          // the image attached to the next question: {url, name, width, height, ...}
    busy: false,
    controller: null,     // the AbortController of the request in flight
    stopReason: null,     // why that request was aborted: "stop", "timeout", "reset"
  };

  // -- storage (may be unavailable: private modes, sandboxed frames) ----------------------------------

  function storageGet(store, key) {
    try { return window[store].getItem(key); } catch { return null; }
  }
  function storageSet(store, key, value) {
    try {
      if (value === null) window[store].removeItem(key); else window[store].setItem(key, value);
    } catch { /* not kept: the value lives in memory only */ }
  }

  let memoryKey = storageGet("sessionStorage", KEY_STORE) || "";
  const apiKey = () => memoryKey;
  function setApiKey(key) {
    memoryKey = key || "";
    storageSet("sessionStorage", KEY_STORE, key ? key : null);
    el.keyField.value = "";
    el.keyField.placeholder = memoryKey ? "a key is set (hidden)" : "none";
  }

  // -- settings ----------------------------------------------------------------------------------

  const settings = {};
  const settingInputs = { temperature: el.temperature, maxTokens: el.maxTokens, maxSide: el.maxSide,
    timeout: el.timeout };

  function loadSettings() {
    let saved = {};
    try { saved = JSON.parse(storageGet("localStorage", SETTINGS_STORE) || "{}") || {}; } catch { saved = {}; }
    for (const [name, [def]] of Object.entries(SETTINGS)) {
      const v = clampSetting(name, saved[name]);
      settings[name] = v === null ? def : v;
      settingInputs[name].value = String(settings[name]);
    }
    settings.showProbs = saved.showProbs === true;
    el.probs.checked = settings.showProbs;
  }

  function clampSetting(name, raw) {
    const [, min, max, integer] = SETTINGS[name];
    if (raw === "" || raw === null || raw === undefined) return null;
    const n = Number(raw);
    if (!Number.isFinite(n) || n < min || n > max || (integer && !Number.isInteger(n))) return null;
    return n;
  }

  function onSettingInput(event) {
    const input = event.target;
    const name = input.name;
    const v = clampSetting(name, input.value);
    input.setAttribute("aria-invalid", v === null ? "true" : "false");
    if (v === null) return;
    settings[name] = v;
    storageSet("localStorage", SETTINGS_STORE, JSON.stringify(settings));
  }

  // -- small helpers --------------------------------------------------------------------------------

  function setStatus(text) { el.status.textContent = text || ""; }

  function showError(message) {
    el.errorText.textContent = message;
    el.error.hidden = false;
  }
  function clearError() {
    el.error.hidden = true;
    el.errorText.textContent = "";
  }

  function setModelStatus(kind, text) {
    el.modelDot.dataset.state = kind;
    el.modelName.textContent = text;
    el.modelName.title = text;
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if (apiKey()) h.Authorization = `Bearer ${apiKey()}`;
    return h;
  }

  function fmt(n, digits) {
    return Number.isFinite(n) ? n.toFixed(digits) : "–";
  }

  // An HTTP error answered by the server (or a failure described like one).
  class ApiError extends Error {
    constructor(status, message, extra = {}) {
      super(message);
      this.status = status;
      this.code = extra.code || null;
      this.type = extra.type || null;
      this.retryAfter = extra.retryAfter || null;
    }
  }

  // The request ended without a complete answer for a reason other than an HTTP status.
  class TransportError extends Error {
    constructor(kind, message) {
      super(message);
      this.kind = kind;  // "offline", "lost", "timeout", "protocol", "server"
    }
  }

  async function apiError(resp) {
    let message = "";
    let extra = { retryAfter: resp.headers.get("Retry-After") };
    try {
      const text = await resp.text();
      try {
        const body = JSON.parse(text);
        if (body && body.error) {
          message = typeof body.error === "string" ? body.error : body.error.message || "";
          extra = { ...extra, code: body.error.code, type: body.error.type };
        } else if (body && body.detail) {
          message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
        }
      } catch {
        message = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300);
      }
    } catch { /* the body could not be read: the status says enough */ }
    return new ApiError(resp.status, message || resp.statusText || "no details", extra);
  }

  function offlineError() {
    return new TransportError("offline", `Could not reach the server at ${location.origin} (is gracevlm serve ` +
      "still running?). Nothing was sent.");
  }

  // A readable sentence for any failure.
  function describe(err) {
    if (err instanceof ApiError) {
      const s = err.status;
      const msg = err.message.replace(/\.?$/, ".");
      if (s === 401) return `Error 401 (API key): ${msg} Enter the server's key (Settings → API key).`;
      if (s === 413) return `Error 413 (too large): ${msg} Choose a smaller image, or lower ` +
        "\"Largest image side\" in Settings.";
      if (s === 422) return `Error 422 (unreadable image): ${msg} Try another image file (JPEG or PNG).`;
      const later = err.retryAfter ? `in ${err.retryAfter} s` : "shortly";
      if (s === 429) return `Error 429 (server busy): ${msg} Try again ${later}.`;
      if (s === 503) return `Error 503 (not ready): ${msg} Try again ${later}.`;
      if (s === 408) return `Error 408 (timeout): ${msg}`;
      if (s >= 500) return `Error ${s} (server error): ${msg}`;
      if (s === 0) return `The server stopped the answer: ${msg}`;
      return `Error ${s}: ${msg}`;
    }
    if (err instanceof TransportError) return err.message;
    return `Something went wrong in the page: ${err && err.message ? err.message : err}`;
  }

  // -- the model name and readiness -------------------------------------------------------------------

  let healthTimer = null;

  async function refreshModel() {
    clearTimeout(healthTimer);
    let resp;
    try {
      resp = await fetch("/v1/models", { headers: headers(false), cache: "no-store",
        signal: AbortSignal.timeout(15000) });
    } catch {
      setModelStatus("offline", "server unreachable");
      return false;
    }
    if (resp.status === 401) {
      setModelStatus("key", "API key needed");
      if (await askKey(keyReason())) return refreshModel();
      return false;
    }
    if (!resp.ok) {
      setModelStatus("offline", `error ${resp.status}`);
      showError(describe(await apiError(resp)));
      return false;
    }
    try {
      const body = await resp.json();
      state.model = body.data[0].id;
    } catch {
      setModelStatus("offline", "unexpected /v1/models answer");
      return false;
    }
    setModelStatus("loading", state.model);
    checkHealth();
    return true;
  }

  async function checkHealth() {
    clearTimeout(healthTimer);
    try {
      const resp = await fetch("/health", { cache: "no-store", signal: AbortSignal.timeout(10000) });
      if (resp.ok) {
        setModelStatus("ready", state.model);
        el.modelName.title = `${state.model}: ready`;
        return;
      }
      const body = await resp.json().catch(() => ({}));
      if (body.status === "error") {
        setModelStatus("offline", `${state.model} (failed to load)`);
        showError(`The model failed to load: ${body.error || "see the server log"}`);
        return;
      }
      setModelStatus("loading", `${state.model} (loading…)`);
    } catch {
      setModelStatus("offline", `${state.model} (unreachable)`);
      return;
    }
    healthTimer = setTimeout(checkHealth, 2000);
  }

  // -- the API key dialog ---------------------------------------------------------------------------

  let keyPrompt = null;  // one dialog at a time; callers share its answer

  function keyReason() {
    return apiKey() ? "The server did not accept the API key. Check it and enter it again."
      : "This server requires an API key (it was started with --api-key). Enter it to continue.";
  }

  // Show the key dialog; resolves true once a key is entered, false when the dialog is cancelled.
  function askKey(reason) {
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve) => {
      el.keyReason.textContent = reason;
      el.keyError.hidden = true;
      el.keyInput.value = "";
      const done = (ok) => {
        el.keyForm.removeEventListener("submit", onSubmit);
        el.keyCancel.removeEventListener("click", onCancel);
        el.keyDialog.removeEventListener("cancel", onCancel);
        if (el.keyDialog.open) el.keyDialog.close();
        keyPrompt = null;
        resolve(ok);
      };
      const onSubmit = (event) => {
        event.preventDefault();
        const key = el.keyInput.value.trim();
        if (!key || !/^[\x21-\x7e]+$/.test(key)) {
          el.keyError.textContent = key ? "A key is printable ASCII without spaces." : "Enter the key.";
          el.keyError.hidden = false;
          el.keyInput.focus();
          return;
        }
        setApiKey(key);
        done(true);
      };
      const onCancel = (event) => {
        event.preventDefault();
        done(false);
      };
      el.keyForm.addEventListener("submit", onSubmit);
      el.keyCancel.addEventListener("click", onCancel);
      el.keyDialog.addEventListener("cancel", onCancel);
      el.keyDialog.showModal();
      el.keyInput.focus();
    });
    return keyPrompt;
  }

  // -- images -----------------------------------------------------------------------------------------

  function readAsDataURL(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  async function decodeImage(blob) {
    const url = URL.createObjectURL(blob);
    try {
      const img = new Image();
      img.decoding = "async";
      img.src = url;
      await img.decode();
      return img;
    } finally {
      // the decoded image stays usable for drawing after its URL is revoked
      setTimeout(() => URL.revokeObjectURL(url), 0);
    }
  }

  // A file -> what is sent: the file itself when it is a common format and small enough, else a JPEG
  // drawn on a canvas with its longest side at most settings.maxSide.
  async function prepareImage(file) {
    const name = file.name || "pasted image";
    if (file.type && !file.type.startsWith("image/")) throw new Error(`${name} is not an image (${file.type}).`);
    if (file.size > MAX_FILE_BYTES) {
      throw new Error(`${name} is ${(file.size / 2 ** 20).toFixed(0)} MiB; the page takes images up to ` +
        `${MAX_FILE_BYTES / 2 ** 20} MiB.`);
    }
    let img;
    try {
      img = await decodeImage(file);
    } catch {
      throw new Error(`${name} could not be read as an image by this browser.`);
    }
    const w = img.naturalWidth, h = img.naturalHeight;
    if (!w || !h) throw new Error(`${name} has no pixels.`);
    const maxSide = settings.maxSide;
    if (Math.max(w, h) <= maxSide && KEEP_TYPES.has(file.type)) {
      return { url: await readAsDataURL(file), name, width: w, height: h, sourceWidth: w, sourceHeight: h,
        resized: false, bytes: file.size };
    }
    const scale = Math.min(1, maxSide / Math.max(w, h));
    const cw = Math.max(1, Math.round(w * scale)), ch = Math.max(1, Math.round(h * scale));
    const canvas = document.createElement("canvas");
    canvas.width = cw;
    canvas.height = ch;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#ffffff";  // JPEG has no transparency
    ctx.fillRect(0, 0, cw, ch);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(img, 0, 0, cw, ch);
    const url = canvas.toDataURL("image/jpeg", 0.9);
    return { url, name, width: cw, height: ch, sourceWidth: w, sourceHeight: h, resized: true,
      bytes: Math.floor((url.length - url.indexOf(",") - 1) * 3 / 4) };
  }

  function sizeText(bytes) {
    return bytes < 1024 ? `${bytes} B` : bytes < 2 ** 20 ? `${(bytes / 1024).toFixed(0)} KiB`
      : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  }

  async function attach(file) {
    if (!file) return;
    clearError();
    setStatus(`Reading ${file.name || "the image"}…`);
    try {
      setImage(await prepareImage(file));
      setStatus("");
    } catch (err) {
      setStatus("");
      showError(err.message);
    } finally {
      el.file.value = "";
    }
  }

  function setImage(image) {
    state.image = image;
    if (!image) {
      el.preview.hidden = true;
      el.previewImg.removeAttribute("src");
      el.previewInfo.textContent = "";
      return;
    }
    el.previewImg.src = image.url;
    el.previewImg.alt = `Preview of ${image.name}`;
    const dims = image.resized
      ? `${image.sourceWidth}×${image.sourceHeight} → ${image.width}×${image.height} (scaled down)`
      : `${image.width}×${image.height}`;
    el.previewInfo.textContent = `${image.name} · ${dims} · ${sizeText(image.bytes)}`;
    el.preview.hidden = false;
  }

  // -- the conversation view ----------------------------------------------------------------------------

  function scrollToEnd(force) {
    const c = el.chat;
    if (force || c.scrollHeight - c.scrollTop - c.clientHeight < 120) c.scrollTop = c.scrollHeight;
  }

  function addUserMessage(text, image) {
    const li = document.createElement("li");
    li.className = "msg msg-user";
    const role = document.createElement("span");
    role.className = "msg-role";
    role.textContent = "You";
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    if (image) {
      const img = document.createElement("img");
      img.className = "msg-image";
      img.src = image.url;
      img.alt = `Your image: ${image.name} (${image.width}×${image.height})`;
      bubble.append(img);
    }
    if (text) {
      const p = document.createElement("p");
      p.className = "msg-text";
      p.textContent = text;
      bubble.append(p);
    }
    li.append(role, bubble);
    el.log.append(li);
    el.empty.hidden = true;
    scrollToEnd(true);
    return li;
  }

  function addAnswer() {
    const li = document.createElement("li");
    li.className = "msg msg-assistant";
    li.dataset.state = "streaming";
    li.dataset.deltas = "0";
    li.setAttribute("aria-busy", "true");
    const role = document.createElement("span");
    role.className = "msg-role";
    role.textContent = state.model || "Model";
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    const text = document.createElement("p");
    text.className = "msg-text";
    bubble.append(text);
    const tokens = document.createElement("p");
    tokens.className = "msg-tokens";
    tokens.hidden = true;
    tokens.setAttribute("aria-label", "The answer's tokens; focus one to see its probability");
    bubble.append(tokens);
    const meta = document.createElement("p");
    meta.className = "msg-meta";
    li.append(role, bubble, meta);
    el.log.append(li);
    scrollToEnd(true);
    return { li, text, meta, tokens };
  }

  // -- token probabilities ---------------------------------------------------------------------------

  const pct = (logprob) => {
    const p = Math.exp(logprob) * 100;
    return p >= 99.95 ? "100%" : p >= 0.1 ? `${p.toFixed(1)}%` : "<0.1%";
  };
  const shown = (token) => JSON.stringify(token);  // quotes make spaces and newlines visible

  function addTokens(view, entries) {
    for (const e of entries) {
      const span = document.createElement("span");
      span.className = "tok";
      span.tabIndex = 0;
      const p = Math.exp(e.logprob);
      span.dataset.p = String(p);
      span.dataset.level = p >= 0.8 ? "high" : p >= 0.3 ? "mid" : "low";
      span.textContent = e.token;
      const alts = (e.top_logprobs || []).map((a) => `${shown(a.token)} ${pct(a.logprob)}`);
      span.dataset.tip = `${shown(e.token)} ${pct(e.logprob)}` +
        (alts.length ? `\nalternatives: ${alts.join(", ")}` : "");
      span.setAttribute("aria-label", span.dataset.tip);
      view.tokens.append(span);
    }
    view.tokens.hidden = view.tokens.childElementCount === 0;
  }

  function showTip(span) {
    el.tokTip.textContent = span.dataset.tip;
    el.tokTip.hidden = false;
    const r = span.getBoundingClientRect();
    const tip = el.tokTip.getBoundingClientRect();
    const left = Math.max(4, Math.min(r.left, window.innerWidth - tip.width - 4));
    const top = r.top - tip.height - 6 >= 0 ? r.top - tip.height - 6 : r.bottom + 6;
    el.tokTip.style.left = `${left}px`;
    el.tokTip.style.top = `${top}px`;
  }
  const hideTip = () => { el.tokTip.hidden = true; };

  function statsText(r) {
    const parts = [];
    const n = r.usage ? r.usage.completion_tokens : r.deltas;
    const approx = r.usage ? "" : "≈";
    parts.push(`${approx}${n} token${n === 1 ? "" : "s"}`);
    // decode speed: tokens after the first over the time they took; whole-request rate if too short to tell
    const decodeS = (r.tLast - r.tFirst) / 1000;
    const tps = n > 1 && decodeS > 0.02 ? (n - 1) / decodeS : n / ((r.tEnd - r.t0) / 1000);
    parts.push(`${fmt(tps, 1)} tok/s`);
    if (r.tFirst !== null) parts.push(`first token ${fmt((r.tFirst - r.t0) / 1000, 2)} s`);
    if (r.usage) parts.push(`prompt ${r.usage.prompt_tokens} tokens`);
    return parts.join(" · ");
  }

  function finishAnswer(view, r, how) {
    view.li.dataset.state = how;
    view.li.setAttribute("aria-busy", "false");
    const stats = statsText(r);
    view.meta.textContent = stats;
    view.meta.title = "tok/s: decode speed after the first token; first token: time from sending to the " +
      "first text (image encoding, queueing and prefill included)";
    let note = "";
    if (how === "stopped") note = "stopped";
    else if (r.finish === "length") note = "cut at the max tokens limit";
    if (note) {
      const span = document.createElement("span");
      span.className = "note";
      span.textContent = ` · ${note}`;
      view.meta.append(span);
    }
    document.dispatchEvent(new CustomEvent("gracevlm:answer", { detail: { text: r.text, state: how,
      usage: r.usage, finish: r.finish, stats } }));
  }

  // -- one streamed completion -----------------------------------------------------------------------------

  // POST the messages and render the answer into view as it streams. Resolves with the result; rejects
  // with ApiError (HTTP status, or an error event in the stream: status 0) or TransportError.
  async function streamAnswer(messages, view) {
    const ctl = new AbortController();
    state.controller = ctl;
    state.stopReason = null;
    const silenceMs = settings.timeout * 1000;
    let silence = null;
    const poke = () => {
      clearTimeout(silence);
      silence = setTimeout(() => { state.stopReason = state.stopReason || "timeout"; ctl.abort(); }, silenceMs);
    };
    const r = { text: "", deltas: 0, usage: null, finish: null, t0: performance.now(), tFirst: null,
      tLast: null, tEnd: null, sawDone: false };
    const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true },
      temperature: settings.temperature, max_tokens: settings.maxTokens };
    if (settings.showProbs) {
      body.logprobs = true;
      body.top_logprobs = 5;
    }

    const aborted = () => {
      if (state.stopReason === "timeout") {
        return new TransportError("timeout", `The server sent nothing for ${silenceMs / 1000} s, so the ` +
          "request was stopped (the timeout is in Settings).");
      }
      return null;
    };

    poke();
    try {
      let resp;
      try {
        resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true),
          body: JSON.stringify(body), signal: ctl.signal, cache: "no-store" });
      } catch (err) {
        if (state.stopReason) throw aborted() || err;
        throw offlineError();
      }
      if (!resp.ok) throw await apiError(resp);
      if (!resp.body) throw new TransportError("protocol", "This browser cannot read streamed answers.");
      poke();
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (err) {
          if (state.stopReason) throw aborted() || err;
          throw new TransportError("lost", "The connection to the server was lost while the answer was " +
            "streaming (did the server stop?).");
        }
        if (chunk.done) break;
        poke();
        buf += decoder.decode(chunk.value, { stream: true });
        buf = handleEvents(buf, r, view);
        if (r.sawDone) break;
      }
      buf += decoder.decode();
      handleEvents(buf + "\n\n", r, view);
      if (!r.sawDone) {
        throw new TransportError("lost", "The answer stream ended before it was complete (did the server " +
          "stop?).");
      }
      r.tEnd = performance.now();
      return r;
    } catch (err) {
      r.tEnd = performance.now();
      if (state.stopReason === "stop" || state.stopReason === "reset") {
        r.stopped = true;
        return r;
      }
      err.partial = r;
      throw err;
    } finally {
      clearTimeout(silence);
      ctl.abort();  // closes the connection if anything is left of it
      state.controller = null;
    }
  }

  // Parse the complete events in buf (blank-line separated), apply them, return the unparsed rest.
  function handleEvents(buf, r, view) {
    buf = buf.replace(/\r\n/g, "\n");
    // a lone \r at the end may be the first half of \r\n: keep it for the next chunk
    const held = buf.endsWith("\r") ? "\r" : "";
    if (held) buf = buf.slice(0, -1);
    buf = buf.replace(/\r/g, "\n");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
      if (!data.length) continue;  // comments, keep-alives, other fields
      const payload = data.join("\n");
      if (payload === "[DONE]") {
        r.sawDone = true;
        return "";
      }
      let obj;
      try {
        obj = JSON.parse(payload);
      } catch {
        throw new TransportError("protocol", "The server sent a stream event that is not JSON.");
      }
      applyChunk(obj, r, view);
    }
    return buf + held;
  }

  function applyChunk(obj, r, view) {
    if (obj.error) {
      const e = obj.error;
      throw new ApiError(0, (typeof e === "string" ? e : e.message) || "unknown error",
        { code: e.code, type: e.type });
    }
    if (obj.usage) r.usage = obj.usage;
    const choice = obj.choices && obj.choices[0];
    if (!choice) return;
    if (choice.finish_reason) r.finish = choice.finish_reason;
    const entries = choice.logprobs && choice.logprobs.content;
    if (entries && entries.length) addTokens(view, entries);
    const piece = choice.delta && choice.delta.content;
    if (!piece) return;
    const now = performance.now();
    if (r.tFirst === null) r.tFirst = now;
    r.tLast = now;
    r.text += piece;
    r.deltas += 1;
    view.text.append(piece);
    view.li.dataset.deltas = String(r.deltas);
    scrollToEnd(false);
    document.dispatchEvent(new CustomEvent("gracevlm:delta", { detail: { text: r.text, length: r.text.length,
      deltas: r.deltas } }));
  }

  // -- sending a question -------------------------------------------------------------------------------

  function setBusy(busy) {
    state.busy = busy;
    el.send.disabled = busy;
    el.stop.hidden = !busy;
    el.composer.setAttribute("aria-busy", busy ? "true" : "false");
    if (!busy && document.activeElement === el.stop) el.question.focus();
  }

  async function send() {
    if (state.busy) return;
    const text = el.question.value.trim();
    const image = state.image;
    if (!text && !image) {
      setStatus("Type a question (and attach an image if you like).");
      el.question.focus();
      return;
    }
    clearError();
    setStatus("");
    setBusy(true);
    let userLi = null, view = null;
    try {
      if (!state.model) await refreshModel();
      if (!state.model) {
        showError(el.modelDot.dataset.state === "key"
          ? "An API key is needed to use this server: enter it in Settings → API key."
          : describe(offlineError()));
        return;
      }
      const content = image
        ? [{ type: "image_url", image_url: { url: image.url } }, ...(text ? [{ type: "text", text }] : [])]
        : text;
      const userMsg = { role: "user", content };
      userLi = addUserMessage(text, image);
      el.question.value = "";
      setImage(null);
      for (let attempt = 0; ; attempt++) {
        view = addAnswer();
        try {
          const r = await streamAnswer([...state.history, userMsg], view);
          if (state.stopReason === "reset") return;  // "New chat" during the answer: the view is gone already
          if (r.stopped && !r.text) throw Object.assign(new Error("stopped"), { stoppedEmpty: true, partial: r });
          state.history.push(userMsg, { role: "assistant", content: r.text });
          finishAnswer(view, r, r.stopped ? "stopped" : "done");
          if (el.modelDot.dataset.state !== "ready") setModelStatus("ready", state.model);
          return;
        } catch (err) {
          view.li.remove();
          view = null;
          if (err instanceof ApiError && err.status === 401 && attempt < 3) {
            setModelStatus("key", "API key needed");
            if (await askKey(keyReason())) {
              refreshModel();
              continue;
            }
          }
          throw err;
        }
      }
    } catch (err) {
      // the turn did not happen: take it out of the view and give the question back for another try
      if (userLi) userLi.remove();
      if (state.stopReason === "reset") return;
      if (!el.log.children.length) el.empty.hidden = false;
      if (!el.question.value) el.question.value = text;
      if (!state.image && image) setImage(image);
      if (err.stoppedEmpty) {
        setStatus("Stopped before any answer arrived.");
      } else {
        showError(describe(err));
        if (err instanceof TransportError && (err.kind === "offline" || err.kind === "lost")) {
          setModelStatus("offline", `${state.model || "server"} (unreachable)`);
        } else if (err instanceof ApiError && err.code === "model_not_found") {
          state.model = null;  // the server was restarted with another model: ask again for the next try
          refreshModel();
        }
      }
      document.dispatchEvent(new CustomEvent("gracevlm:answer", { detail: { error: describe(err) } }));
    } finally {
      setBusy(false);
    }
  }

  function stop(reason) {
    if (state.controller) {
      state.stopReason = reason;
      state.controller.abort();
    }
  }

  function resetConversation() {
    hideTip();
    state.history = [];
    el.log.replaceChildren();
    el.empty.hidden = false;
    setImage(null);
    el.question.value = "";
    clearError();
    setStatus("");
  }

  // -- wiring ---------------------------------------------------------------------------------------------

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  el.question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!state.busy) send();
    }
  });
  el.stop.addEventListener("click", () => stop("stop"));
  el.reset.addEventListener("click", () => {
    if (state.busy) stop("reset");
    resetConversation();
    el.question.focus();
  });
  el.errorClose.addEventListener("click", () => {
    clearError();
    el.question.focus();
  });

  el.file.addEventListener("change", () => attach(el.file.files && el.file.files[0]));
  el.previewRemove.addEventListener("click", () => {
    setImage(null);
    el.fileLabel.focus();
  });
  el.question.addEventListener("paste", (event) => {
    const items = event.clipboardData ? [...event.clipboardData.files] : [];
    const image = items.find((f) => f.type.startsWith("image/"));
    if (image) {
      event.preventDefault();
      attach(image);
    }
  });

  // drag and drop anywhere on the page
  let dragDepth = 0;
  const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    el.dropOverlay.hidden = false;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  const endDrag = () => {
    dragDepth = 0;
    el.dropOverlay.hidden = true;
    document.body.classList.remove("dragging");
  };
  document.addEventListener("dragleave", (event) => {
    if (!hasFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) endDrag();
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    endDrag();
    const files = [...event.dataTransfer.files];
    const image = files.find((f) => f.type.startsWith("image/")) || files[0];
    if (image) attach(image);
  });

  el.settingsToggle.addEventListener("click", () => {
    const open = el.settings.hidden;
    el.settings.hidden = !open;
    el.settingsToggle.setAttribute("aria-expanded", String(open));
    if (open) el.temperature.focus();
  });
  for (const input of Object.values(settingInputs)) input.addEventListener("input", onSettingInput);
  el.probs.addEventListener("change", () => {
    settings.showProbs = el.probs.checked;
    storageSet("localStorage", SETTINGS_STORE, JSON.stringify(settings));
  });
  for (const [on, off] of [["mouseover", "mouseout"], ["focusin", "focusout"]]) {
    el.log.addEventListener(on, (event) => {
      const span = event.target.closest && event.target.closest(".tok");
      if (span) showTip(span);
    });
    el.log.addEventListener(off, (event) => {
      if (event.target.closest && event.target.closest(".tok")) hideTip();
    });
  }
  el.settingsForm.addEventListener("submit", (event) => event.preventDefault());  // Enter in a field
  el.keySave.addEventListener("click", () => {
    const key = el.keyField.value.trim();
    if (key && !/^[\x21-\x7e]+$/.test(key)) {
      showError("An API key is printable ASCII without spaces.");
      return;
    }
    if (!key) return;
    setApiKey(key);
    clearError();
    setStatus("API key saved for this tab.");
    refreshModel();
  });
  el.keyForget.addEventListener("click", () => {
    setApiKey("");
    setStatus("API key forgotten.");
  });
  el.keyField.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      el.keySave.click();
    }
  });

  loadSettings();
  setApiKey(apiKey());
  setBusy(false);
  refreshModel();
})();
