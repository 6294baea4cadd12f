// The safl page: plain script, no framework and no build step, so it is served as written
// and works with no network beyond the service itself.
"use strict";

const $ = (selector) => document.querySelector(selector);
const form = $("#options");
const picker = $("#files");
const dropZone = $("#drop");
const keyRow = $("#key-row");
const keyInput = $("#api-key");
const statusLine = $("#status");
const errorBox = $("#error");
const results = $("#results");
const KEY_STORE = "safl-api-key";
const OPTIONS = ["allowlist", "blocklist", "lexicon", "top_k"];

let lastFiles = [];
let previews = [];
// Only the newest request may draw: an answer to crops the user has since replaced is dropped.
let generation = 0;

// sessionStorage, not localStorage: the key should not outlive the tab on a shared machine.
keyInput.value = sessionStorage.getItem(KEY_STORE) || "";
keyInput.addEventListener("input", () => {
  if (keyInput.value) sessionStorage.setItem(KEY_STORE, keyInput.value);
  else sessionStorage.removeItem(KEY_STORE);
});
keyInput.addEventListener("change", loadInfo);

function authHeaders() {
  const key = keyInput.value.trim();
  return key ? { "X-API-Key": key } : {};
}

function percent(p) {
  return p >= 0.001 ? `${(100 * p).toFixed(1)} %` : "< 0.1 %";
}

// Every error the service sends has this shape; a proxy's error page or a dropped connection does not.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.code) return body.error;
  } catch (_) { /* not JSON */ }
  return { code: `http_${response.status}`, message: response.statusText || "unexpected reply" };
}

function showError(error) {
  errorBox.replaceChildren();
  if (!error) return;
  const p = document.createElement("p");
  const code = document.createElement("code");
  code.textContent = error.code;
  p.append(code, " ", error.message);
  errorBox.append(p);
  if (error.code === "unauthorized") {
    keyRow.hidden = false;
    keyInput.focus();
  }
}

async function loadInfo() {
  const line = $("#model");
  let response;
  try {
    response = await fetch("info", { headers: authHeaders() });
  } catch (e) {
    line.textContent = `The service cannot be reached (${e.message}).`;
    return;
  }
  if (response.status === 401) {
    keyRow.hidden = false;
    line.textContent = keyInput.value ? "The API key was refused." : "This service needs an API key.";
    return;
  }
  if (!response.ok) {
    const error = await errorOf(response);
    line.textContent = `${error.code}: ${error.message}`;
    if (error.code === "not_ready") setTimeout(loadInfo, 2000);  // still loading the weights
    return;
  }
  const info = await response.json();
  line.textContent = `${info.model} · reads ${info.input.width}×${info.input.height} · ${info.device}`;
}

function card(file, previewUrl) {
  const li = $("#card").content.firstElementChild.cloneNode(true);
  const input = li.querySelector(".input img");
  input.src = previewUrl;
  input.alt = `input crop ${file.name}`;
  li.querySelector(".filename").textContent = file.name;
  li.querySelector(".text").textContent = "…";
  li.setAttribute("aria-busy", "true");
  return li;
}

// A file the service could not read (sent with per_file_errors): its error in its own card,
// and the other crops of the request are still read.
function fillError(li, error) {
  li.removeAttribute("aria-busy");
  li.classList.add("failed");
  li.querySelector(".text").textContent = "—";
  const p = li.querySelector(".file-error");
  const code = document.createElement("code");
  code.textContent = error.code;
  p.replaceChildren(code, " ", error.message);
  p.hidden = false;
}

function fill(li, result) {
  li.removeAttribute("aria-busy");
  const text = li.querySelector(".text");
  text.textContent = result.text;
  text.classList.toggle("empty", result.text === "");
  if (result.text === "") text.title = "the model read nothing";
  li.querySelector(".confidence").textContent = `confidence ${percent(result.confidence)}`;

  if (result.rectified) {
    const figure = li.querySelector(".rectified");
    const img = figure.querySelector("img");
    img.src = result.rectified;
    img.alt = `${result.filename} rectified to the model's input`;
    figure.hidden = false;
  }

  // One cell per character: Array.from splits by code point, as the server counts characters.
  const strip = li.querySelector(".chars");
  strip.replaceChildren();
  strip.setAttribute("aria-label", "confidence of each character");
  const chars = Array.from(result.text);
  chars.forEach((ch, i) => {
    const p = result.char_confidences[i] ?? 0;
    const cell = document.createElement("span");
    cell.textContent = ch;
    cell.title = `${JSON.stringify(ch)} ${percent(p)}`;
    // Hue 0 (red) to 120 (green), set through the style object: the CSP forbids inline style attributes.
    cell.style.backgroundColor = `hsl(${Math.round(120 * Math.min(Math.max(p, 0), 1))} 80% 72%)`;
    strip.append(cell);
  });

  const list = li.querySelector(".alternatives");
  list.replaceChildren();
  for (const alt of result.alternatives || []) {
    const item = document.createElement("li");
    const word = document.createElement("code");
    word.textContent = alt.text === "" ? "(empty)" : alt.text;
    item.append(word, ` ${percent(alt.confidence)}`);
    list.append(item);
  }
  list.hidden = list.childElementCount === 0;
}

async function read(files) {
  if (!files.length) return;
  // Kept before the options are checked, so "Read again" reads them once an option is fixed.
  lastFiles = files;
  $("#again").disabled = false;
  if (!form.reportValidity()) return;
  const mine = ++generation;
  previews.forEach(URL.revokeObjectURL);
  previews = files.map((f) => URL.createObjectURL(f));
  const cards = files.map((f, i) => card(f, previews[i]));
  results.replaceChildren(...cards);
  showError(null);
  statusLine.textContent = `Reading ${files.length} crop${files.length === 1 ? "" : "s"}…`;

  const body = new FormData();
  for (const f of files) body.append("files", f, f.name);
  body.append("per_file_errors", "true");
  for (const name of OPTIONS) {
    const value = form.elements[name].value;
    // A blank lexicon is no lexicon; a lone space is a meaningful allowlist.
    if (name === "lexicon" ? value.trim() : value) body.append(name, value);
  }

  const started = performance.now();
  let response;
  try {
    response = await fetch("recognize?debug=rectified", { method: "POST", body, headers: authHeaders() });
  } catch (e) {
    if (mine === generation) failed({ code: "network", message: `the service cannot be reached (${e.message})` }, cards);
    return;
  }
  let reply = null;
  if (response.ok) {
    try {
      reply = await response.json();
    } catch (_) { /* a 200 that is not JSON: a proxy's page, say */ }
  }
  if (mine !== generation) return;
  if (!reply || !Array.isArray(reply.results)) {
    return failed(response.ok ? { code: "bad_reply", message: "the reply was not the service's JSON" } : await errorOf(response), cards);
  }
  reply.results.forEach((result, i) => (result.error ? fillError(cards[i], result.error) : fill(cards[i], result)));
  const unread = reply.results.filter((result) => result.error).length;
  const note = unread ? ` ${unread} of ${files.length} could not be read.` : "";
  statusLine.textContent = `Read by ${reply.model} in ${Math.round(performance.now() - started)} ms.${note}`;
}

function failed(error, cards) {
  statusLine.textContent = "";
  for (const li of cards) {
    li.removeAttribute("aria-busy");
    li.querySelector(".text").textContent = "—";
  }
  showError(error);
}

function images(fileList) {
  return Array.from(fileList || []).filter((f) => f.type.startsWith("image/"));
}

picker.addEventListener("change", () => {
  read(Array.from(picker.files));
  picker.value = "";  // picking the same file again must fire "change" again
});

form.addEventListener("submit", (event) => {
  event.preventDefault();
  read(lastFiles);
});

// A file dropped beside the zone would make the browser navigate away to it.
for (const type of ["dragover", "drop"]) document.addEventListener(type, (event) => event.preventDefault());
dropZone.addEventListener("dragover", () => dropZone.classList.add("over"));
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
dropZone.addEventListener("drop", (event) => {
  dropZone.classList.remove("over");
  read(images(event.dataTransfer.files));
});

document.addEventListener("paste", (event) => {
  const pasted = images(event.clipboardData && event.clipboardData.files);
  if (!pasted.length) return;  // plain text pastes into the option fields as usual
  event.preventDefault();
  // A pasted screenshot is named "image.png" by every browser: number them apart.
  read(pasted.map((f, i) => new File([f], `pasted-${i + 1}.${f.type.split("/")[1] || "png"}`, { type: f.type })));
});

loadInfo();
