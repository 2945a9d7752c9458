// The playground: a plain script (no build step) that uses the Images API as any client does.
// Served under a strict Content-Security-Policy: nothing here may rely on inline
// scripts, inline style attributes or requests to another origin.
"use strict";

(() => {
  // The API is the page's own origin, under the same route prefix as this script
  // (".../playground/app.js" -> ".../").
  const API_BASE = new URL("../", document.currentScript.src);
  const KEY_STORAGE = "images-playground.api-key";
  const MIME = { png: "image/png", jpeg: "image/jpeg", webp: "image/webp" };

  const $ = (id) => document.getElementById(id);
  const form = $("request-form");
  const fields = {
    prompt: $("prompt"),
    model: $("model"),
    size: $("size"),
    quality: $("quality"),
    n: $("n"),
    seed: $("seed"),
    background: $("background"),
    output_format: $("output_format"),
    partial_images: $("partial_images"),
  };

  const state = {
    mode: "generate", // or "edit"
    models: [],
    running: null, // the AbortController of the request in flight
    editImage: null, // {blob, width, height} of the image being edited
  };

  // ---- API key: entered once, kept in sessionStorage, sent only as a header ----

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  function authHeaders() {
    const key = apiKey();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function askForKey(message) {
    $("key-message").textContent = message || "This server needs an API key.";
    $("key-panel").hidden = false;
    $("api-key").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    $("key-panel").hidden = true;
    loadModels();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    askForKey("Key forgotten. Enter a key to use the API.");
  });
  $("key-button").addEventListener("click", () => {
    const panel = $("key-panel");
    if (panel.hidden) askForKey(apiKey() ? "A key is set for this tab. Enter another to replace it." : undefined);
    else panel.hidden = true;
  });

  // ---- Errors: the API's own message, next to the field it names ----

  class ApiError extends Error {
    constructor(status, error) {
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.param = error.param || null;
      this.code = error.code || null;
    }
  }

  // error.param as the API names it -> the element that shows its message.
  function errorSlot(param) {
    if (!param) return null;
    const name = param.replace(/\[\]$/, "").split(/[.[]/)[0];
    return form.querySelector(`.field-error[data-for="${CSS.escape(name)}"]`);
  }

  function clearErrors() {
    for (const slot of form.querySelectorAll(".field-error")) slot.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    $("form-error").hidden = true;
    $("form-error").textContent = "";
  }

  function showError(err) {
    if (err.name === "AbortError") return;
    if (err instanceof ApiError && err.status === 401) {
      askForKey(err.message);
    }
    const slot = err instanceof ApiError ? errorSlot(err.param) : null;
    const hidden = slot && slot.closest("[hidden]");
    if (slot && !hidden) {
      slot.textContent = err.message;
      const input = fields[slot.dataset.for] || (slot.dataset.for === "image" ? $("edit-image") : null);
      if (input) input.setAttribute("aria-invalid", "true");
      return;
    }
    const box = $("form-error");
    box.textContent = err instanceof ApiError ? err.message : `Could not reach the server: ${err.message}`;
    box.hidden = false;
  }

  async function errorOf(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      // Not JSON (a proxy's page, say): the status line is all there is.
    }
    const error = body && body.error ? body.error : { message: `HTTP ${response.status} ${response.statusText}` };
    return new ApiError(response.status, error);
  }

  // ---- Models, from /v1/models: ids, families, sizes, qualities are never hard-coded ----

  function isGptImage(model) {
    return !!model && typeof model.family === "string" && model.family.startsWith("gpt-image");
  }

  function isDallE2(model) {
    return !!model && model.family === "dall-e-2";
  }

  function currentModel() {
    return state.models.find((m) => m.id === fields.model.value) || null;
  }

  const CUSTOM_SIZE = "custom";

  function fillSelect(select, options, preferred) {
    const keep = select.value;
    select.replaceChildren(...options.map(([value, label]) => new Option(label, value)));
    const values = options.map(([value]) => value);
    const pick = [keep, preferred].find((v) => v && values.includes(v));
    if (pick) select.value = pick;
  }

  function onModelChange() {
    const model = currentModel();
    const sizes = (model && model.sizes) || [];
    // Any WxH may be typed only where /v1/models says the model takes one (max_pixels).
    const options = sizes.map((s) => [s, s]);
    if (model && model.max_pixels) options.push([CUSTOM_SIZE, "custom…"]);
    // The smallest fixed size is the quickest to try.
    const smallest = sizes
      .filter((s) => /^\d+x\d+$/.test(s))
      .sort((a, b) => area(a) - area(b))[0];
    fillSelect(fields.size, options, smallest);
    onSizeChange();
    fillSelect(fields.quality, ((model && model.qualities) || []).map((q) => [q, q]), null);
    const gpt = isGptImage(model);
    for (const el of form.querySelectorAll(".gpt-only")) el.hidden = !gpt;
    $("variations-button").hidden = !(state.mode === "edit" && isDallE2(model));
  }

  function area(size) {
    const [w, h] = size.split("x").map(Number);
    return w * h;
  }

  async function loadModels() {
    const status = $("server-status");
    status.textContent = "Loading models…";
    let response;
    try {
      response = await fetch(new URL("v1/models", API_BASE), { headers: authHeaders(), cache: "no-store" });
    } catch (err) {
      status.textContent = `Could not reach the server: ${err.message}`;
      return;
    }
    if (!response.ok) {
      const err = await errorOf(response);
      status.textContent = err.message;
      if (response.status === 401) askForKey(err.message);
      return;
    }
    const list = await response.json();
    state.models = list.data || [];
    const previous = fields.model.value;
    fields.model.replaceChildren(
      ...state.models.map((m) => new Option(m.family ? `${m.id} (${m.family})` : m.id, m.id)),
    );
    // Keep the user's model; else start on one that streams previews.
    const start = state.models.find((m) => m.id === previous) || state.models.find(isGptImage) || state.models[0];
    if (start) fields.model.value = start.id;
    onModelChange();
    status.textContent = state.models.length ? `${state.models.length} models` : "No model is available.";
  }

  function onSizeChange() {
    $("size-custom").hidden = fields.size.value !== CUSTOM_SIZE;
  }

  function sizeValue() {
    return fields.size.value === CUSTOM_SIZE ? $("size-custom").value.trim() : fields.size.value;
  }

  fields.model.addEventListener("change", onModelChange);
  fields.size.addEventListener("change", onSizeChange);

  // ---- Mode: generate, or edit an image ----

  function setMode(mode) {
    state.mode = mode;
    for (const tab of form.querySelectorAll("[role=tab]")) {
      tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
    }
    $("edit-fields").hidden = mode !== "edit";
    $("run-button").textContent = mode === "edit" ? "Edit" : "Generate";
    clearErrors();
    onModelChange();
  }

  for (const tab of form.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => setMode(tab.dataset.mode));
  }

  // ---- Keyboard: Enter runs; in the prompt, Ctrl+Enter (Enter alone is a new line) ----

  form.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.isComposing) return;
    const target = event.target;
    if (target instanceof HTMLTextAreaElement) {
      if (!(event.ctrlKey || event.metaKey)) return;
    } else if (target instanceof HTMLButtonElement || (target instanceof HTMLInputElement && target.type === "file")) {
      return; // Enter activates the focused button or file picker as usual.
    }
    event.preventDefault();
    form.requestSubmit();
  });

  // ---- Requests ----

  // The seed to send, as text: the one typed, else (when streaming, whose
  // events carry no seed) a random one, so that every result can show its seed.
  function seedToSend(streaming) {
    const typed = fields.seed.value.trim();
    if (typed || !streaming) return typed || null;
    return String(crypto.getRandomValues(new Uint32Array(1))[0]);
  }

  // The JSON body with the seed spliced in. Digits go out as a number literal
  // exactly as typed (seeds go up to 2^63-1, past what a JS number holds);
  // anything else as a string, so that the API's own message names the problem.
  function jsonWithSeed(body, seed) {
    const json = JSON.stringify(body);
    if (seed === null) return json;
    const literal = /^\d+$/.test(seed) ? seed.replace(/^0+(?=\d)/, "") : JSON.stringify(seed);
    return `${json.slice(0, -1)}${json.length > 2 ? "," : ""}"seed":${literal}}`;
  }

  function intOrRaw(value) {
    const text = value.trim();
    return /^\d+$/.test(text) ? Number(text) : text;
  }

  function generationBody(model, streaming) {
    const body = { prompt: fields.prompt.value, model: fields.model.value, response_format: "b64_json" };
    if (sizeValue()) body.size = sizeValue();
    if (fields.quality.value) body.quality = fields.quality.value;
    if (fields.n.value.trim()) body.n = intOrRaw(fields.n.value);
    if (isGptImage(model)) {
      body.background = fields.background.value;
      body.output_format = fields.output_format.value;
    }
    if (streaming) {
      body.stream = true;
      body.partial_images = intOrRaw(fields.partial_images.value || "0");
    }
    return body;
  }

  // Every family streams (stream and partial_images). Whatever comes back,
  // JSON or an event stream, is read by its content type, so a server that
  // ignores stream for a model still works.
  function wantsStream() {
    return $("stream").checked;
  }

  $("stream").addEventListener("change", () => {
    $("partial-field").hidden = !wantsStream();
  });

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.mode === "edit") runEdit();
    else runGenerate();
  });
  $("variations-button").addEventListener("click", () => runVariations());
  $("stop-button").addEventListener("click", () => state.running && state.running.abort());

  async function runGenerate() {
    const model = currentModel();
    const streaming = wantsStream();
    const seed = seedToSend(streaming);
    const body = generationBody(model, streaming);
    await run(
      "v1/images/generations",
      { headers: { "Content-Type": "application/json" }, body: jsonWithSeed(body, seed) },
      { seed, count: typeof body.n === "number" ? body.n : 1, format: body.output_format || "png" },
    );
  }

  async function editImageAsPng() {
    const { blob } = state.editImage;
    if (blob.type === "image/png") return blob;
    return toPng(await loadImage(blob));
  }

  async function runEdit() {
    if (!state.editImage) {
      showError(new ApiError(400, { message: "Choose an image to edit first.", param: "image" }));
      return;
    }
    const model = currentModel();
    const streaming = wantsStream();
    const seed = seedToSend(streaming);
    const body = generationBody(model, streaming);
    // multipart/form-data as the OpenAI SDKs send it: one file in `image`, the
    // mask as a PNG of the same size, every other field as text.
    const data = new FormData();
    data.append("image", await editImageAsPng(), "image.png");
    const mask = await maskPng();
    if (mask) data.append("mask", mask, "mask.png");
    for (const [name, value] of Object.entries(body)) data.append(name, String(value));
    if (seed !== null) data.append("seed", seed);
    await run("v1/images/edits", { body: data }, { seed, count: typeof body.n === "number" ? body.n : 1, format: body.output_format || "png" });
  }

  async function runVariations() {
    if (!state.editImage) {
      showError(new ApiError(400, { message: "Choose an image first.", param: "image" }));
      return;
    }
    const data = new FormData();
    data.append("image", await editImageAsPng(), "image.png");
    data.append("model", fields.model.value);
    if (sizeValue()) data.append("size", sizeValue());
    if (fields.n.value.trim()) data.append("n", fields.n.value.trim());
    data.append("response_format", "b64_json");
    const count = /^\d+$/.test(fields.n.value.trim()) ? Number(fields.n.value) : 1;
    await run("v1/images/variations", { body: data }, { seed: null, count, format: "png" });
  }

  function setBusy(controller) {
    state.running = controller;
    $("run-button").disabled = !!controller;
    $("variations-button").disabled = !!controller;
    $("stop-button").hidden = !controller;
  }

  async function run(path, init, request) {
    if (state.running) return;
    clearErrors();
    const controller = new AbortController();
    setBusy(controller);
    const started = performance.now();
    const cards = [];
    // This request's cards go above the earlier results, in image order.
    request.anchor = $("results").firstElementChild;
    try {
      const response = await fetch(new URL(path, API_BASE), {
        method: "POST",
        ...init,
        headers: { ...(init.headers || {}), ...authHeaders() },
        signal: controller.signal,
      });
      if (!response.ok) throw await errorOf(response);
      for (let i = 0; i < Math.max(1, Math.min(request.count, 10)); i++) cards.push(newCard(request.anchor));
      const type = response.headers.get("content-type") || "";
      if (type.startsWith("text/event-stream")) {
        await readStream(response, cards, request, started);
      } else {
        showResponse(await response.json(), cards, request, started);
      }
    } catch (err) {
      showError(err);
    } finally {
      for (const card of cards) if (!card.done) card.element.remove();
      updateEmpty();
      setBusy(null);
    }
  }

  function seedOf(request, index, fromResponse) {
    // The response's seed when it carries one a JS number holds exactly; else sent seed + index.
    if (Number.isSafeInteger(fromResponse)) return String(fromResponse);
    if (request.seed !== null && /^\d+$/.test(request.seed)) return String(BigInt(request.seed) + BigInt(index));
    return "–";
  }

  function showResponse(body, cards, request, started) {
    const images = body.data || [];
    const elapsed = performance.now() - started;
    images.forEach((image, i) => {
      const card = cards[i] || newCard(request.anchor);
      cards[i] = card;
      const format = body.output_format || request.format;
      setImage(card, base64Blob(image.b64_json, MIME[format] || "image/png"), format, "final");
      finishCard(card, {
        seed: seedOf(request, i, image.seed),
        size: body.size,
        elapsed,
        usage: body.usage,
        prompt: image.revised_prompt,
      });
    });
  }

  // text/event-stream read from fetch's body: `event:` names it, `data:` is JSON.
  async function readStream(response, cards, request, started) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    const partialsSeen = new Map(); // partial_image_index -> events seen (one per image)
    let completed = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = parseEvent(block);
        if (!event) continue;
        if (event.name === "error") {
          throw new ApiError(500, (event.data && event.data.error) || { message: "The stream failed." });
        }
        const data = event.data || {};
        const kind = data.type || event.name;
        const format = data.output_format || request.format;
        if (kind.endsWith(".partial_image")) {
          // Each preview step sends one event per image, in image order.
          const seen = partialsSeen.get(data.partial_image_index) || 0;
          partialsSeen.set(data.partial_image_index, seen + 1);
          const card = cards[seen % cards.length];
          setImage(card, base64Blob(data.b64_json, MIME[format] || "image/png"), format, "partial", data.partial_image_index);
        } else if (kind.endsWith(".completed")) {
          const card = cards[completed] || (cards[completed] = newCard(request.anchor));
          setImage(card, base64Blob(data.b64_json, MIME[format] || "image/png"), format, "final");
          finishCard(card, {
            seed: seedOf(request, completed, null),
            size: data.size,
            elapsed: performance.now() - started,
            usage: data.usage,
          });
          completed += 1;
        }
      }
    }
  }

  function parseEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return null;
    try {
      return { name, data: JSON.parse(data.join("\n")) };
    } catch (_) {
      return { name, data: null };
    }
  }

  function base64Blob(b64, type) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type });
  }

  // ---- Results ----

  function updateEmpty() {
    $("results-empty").hidden = $("results").children.length > 0;
  }

  function newCard(anchor) {
    const element = $("result-template").content.firstElementChild.cloneNode(true);
    element.dataset.state = "waiting";
    element.querySelector(".badge").textContent = "waiting";
    $("results").insertBefore(element, anchor);
    updateEmpty();
    return { element, url: null, blob: null, done: false };
  }

  function setImage(card, blob, format, stage, partialIndex) {
    const img = card.element.querySelector("img");
    if (card.url) URL.revokeObjectURL(card.url);
    card.url = URL.createObjectURL(blob);
    card.blob = blob;
    card.format = format;
    img.src = card.url;
    card.element.dataset.state = stage;
    const badge = card.element.querySelector(".badge");
    badge.textContent = stage === "partial" ? `preview ${partialIndex + 1}` : "";
    badge.hidden = stage !== "partial";
  }

  function finishCard(card, info) {
    const el = card.element;
    card.done = true;
    el.querySelector(".seed").textContent = info.seed;
    el.querySelector(".time").textContent = `${(info.elapsed / 1000).toFixed(2)} s`;
    const img = el.querySelector("img");
    const size = el.querySelector(".size");
    size.textContent = info.size || "";
    // The decoded image's own dimensions where the response does not say.
    img.addEventListener("load", () => { size.textContent = `${img.naturalWidth}x${img.naturalHeight}`; }, { once: true });
    if (info.usage) {
      const u = info.usage;
      el.querySelector(".usage").textContent = `${u.input_tokens} in + ${u.output_tokens} out = ${u.total_tokens} tokens`;
      el.querySelector(".usage-row").hidden = false;
    }
    if (info.prompt) img.title = info.prompt;
    const link = el.querySelector(".download");
    link.href = card.url;
    link.download = `image-${info.seed === "–" ? Date.now() : info.seed}.${card.format === "jpeg" ? "jpg" : card.format}`;
    link.hidden = false;
    const edit = el.querySelector(".use-for-edit");
    edit.hidden = false;
    edit.addEventListener("click", () => {
      setMode("edit");
      useEditImage(card.blob);
      form.scrollIntoView({ behavior: "smooth", block: "start" });
    });
  }

  // ---- Edit: the image, and the mask painted on a canvas over it ----

  const canvas = $("mask-canvas");
  const paint = canvas.getContext("2d", { willReadFrequently: true });

  function loadImage(blob) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      const url = URL.createObjectURL(blob);
      img.onload = () => { URL.revokeObjectURL(url); resolve(img); };
      img.onerror = () => { URL.revokeObjectURL(url); reject(new Error("That file is not an image this browser can read.")); };
      img.src = url;
    });
  }

  function toPng(img) {
    const c = document.createElement("canvas");
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    c.getContext("2d").drawImage(img, 0, 0);
    return new Promise((resolve) => c.toBlob(resolve, "image/png"));
  }

  async function useEditImage(blob) {
    clearErrors();
    let img;
    try {
      img = await loadImage(blob);
    } catch (err) {
      showError(new ApiError(400, { message: err.message, param: "image" }));
      return;
    }
    state.editImage = { blob, width: img.naturalWidth, height: img.naturalHeight };
    const source = $("edit-source");
    if (source.src.startsWith("blob:")) URL.revokeObjectURL(source.src);
    source.src = URL.createObjectURL(blob);
    // The mask is painted at the image's own resolution, so it is the same size.
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    paint.clearRect(0, 0, canvas.width, canvas.height);
    $("mask-stage").hidden = false;
  }

  $("edit-image").addEventListener("change", (event) => {
    const file = event.target.files && event.target.files[0];
    if (file) useEditImage(file);
  });
  const dropzone = $("dropzone");
  dropzone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropzone.classList.add("over");
  });
  dropzone.addEventListener("dragleave", () => dropzone.classList.remove("over"));
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("over");
    const file = event.dataTransfer.files && event.dataTransfer.files[0];
    if (file) useEditImage(file);
  });

  let last = null; // the previous point of the stroke being painted, in image pixels

  function brushMode() {
    return form.querySelector("input[name=brush-mode]:checked").value;
  }

  function toImagePoint(event) {
    const rect = canvas.getBoundingClientRect();
    const scale = canvas.width / rect.width;
    return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
  }

  function strokeTo(point) {
    // The brush size is in screen pixels, whatever the image's resolution.
    const radius = (Number($("brush-size").value) / 2) * point.scale;
    paint.globalCompositeOperation = brushMode() === "erase" ? "destination-out" : "source-over";
    paint.fillStyle = paint.strokeStyle = "rgb(255, 0, 170)";
    paint.lineWidth = radius * 2;
    paint.lineCap = "round";
    paint.lineJoin = "round";
    paint.beginPath();
    if (last) {
      paint.moveTo(last.x, last.y);
      paint.lineTo(point.x, point.y);
      paint.stroke();
    } else {
      paint.arc(point.x, point.y, radius, 0, Math.PI * 2);
      paint.fill();
    }
    last = point;
  }

  canvas.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    last = null;
    strokeTo(toImagePoint(event));
  });
  canvas.addEventListener("pointermove", (event) => {
    if (last && canvas.hasPointerCapture(event.pointerId)) strokeTo(toImagePoint(event));
  });
  const endStroke = () => { last = null; };
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  $("clear-mask").addEventListener("click", () => paint.clearRect(0, 0, canvas.width, canvas.height));

  // OpenAI's mask: a PNG the size of the image whose alpha is 0 where the
  // image may change and opaque elsewhere. Every painted pixel (antialiased
  // edges included) becomes 0, every other 255: no half-transparent pixels.
  // null when nothing is painted, so the model may change the whole image.
  function maskPng() {
    const { width, height } = canvas;
    const painted = paint.getImageData(0, 0, width, height).data;
    const out = new ImageData(width, height);
    let any = false;
    for (let i = 3; i < painted.length; i += 4) {
      if (painted[i] > 0) any = true;
      else out.data[i] = 255;
    }
    if (!any) return Promise.resolve(null);
    const c = document.createElement("canvas");
    c.width = width;
    c.height = height;
    c.getContext("2d").putImageData(out, 0, 0);
    return new Promise((resolve) => c.toBlob(resolve, "image/png"));
  }

  loadModels();
})();
