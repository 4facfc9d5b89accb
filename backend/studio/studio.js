// Character studio: sign in, describe, generate (async route, progress over Server-Sent
// Events), make more of a picked character from its reference (turnaround sheet or scene),
// pick into a job, browse your characters and jobs, delete with undo.
// Plain browser JavaScript against the REST API; every error reply has one shape:
// {"detail": {"error", "message", "fields"?: [{"loc", "message"}]}}.
"use strict";

const API = "/api/mv";
const CREDENTIAL_STORAGE = "mv.credential"; // sessionStorage: per tab, gone when it closes
const POLL_MS = 1000; // only when the event stream cannot be opened
const STREAM_ATTEMPTS = 3; // failed connections, before any event, that mean "poll instead"
const READY_RECHECK_MS = 10000;
const UNDO_MS = 6000;
const CHARACTERS_PAGE = 8;
const JOBS_PAGE = 10;
// A bearer token is a JWT: three base64url parts separated by dots.
const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;
// The form field each request field is typed in, to name it as the page does.
const FIELD_LABELS = {
  character_description: "Description",
  num_images: "Candidates",
  aspect_ratio: "Aspect ratio",
  seed: "Seed",
  job_id: "Job id",
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, detail) {
    super(detail.message);
    this.status = status;
    this.detail = detail;
  }
}

// ------------------------------------------------------------------ sign-in

function storedCredential() {
  try {
    return JSON.parse(sessionStorage.getItem(CREDENTIAL_STORAGE));
  } catch {
    return null;
  }
}

function credentialHeaders(credential) {
  if (!credential) return {};
  return credential.kind === "token"
    ? { Authorization: `Bearer ${credential.value}` }
    : { "X-API-Key": credential.value };
}

function credentialOf(text) {
  return JWT_SHAPE.test(text) ? { kind: "token", value: text } : { kind: "key", value: text };
}

// Who a token says it is (its `sub`), for the page only: the server verifies the token.
function tokenSubject(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "="))).sub;
  } catch {
    return null;
  }
}

async function send(method, path, body, credential = storedCredential()) {
  const headers = credentialHeaders(credential);
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

async function replyOf(reply) {
  if (reply.status === 204) return null;
  const payload = await reply.json().catch(() => null);
  if (!reply.ok) {
    const detail = payload && payload.detail && payload.detail.error
      ? payload.detail
      : { error: `HTTP ${reply.status}`, message: reply.statusText || "request failed" };
    throw new ApiError(reply.status, detail);
  }
  return payload;
}

async function api(method, path, body) {
  return replyOf(await send(method, path, body));
}

// Whether `credential` (none: no header) may use the API: a list route answers 200 or 401.
async function accepted(credential) {
  const reply = await send("GET", `${API}/jobs?limit=1`, undefined, credential);
  if (reply.status === 401) return { ok: false, detail: (await reply.json()).detail };
  await replyOf(reply);
  return { ok: true };
}

let serverIsOpen = false; // no authentication configured: one owner, no sign-in

function showWho(text, refused = false) {
  $("who").textContent = text;
  $("who").classList.toggle("refused", refused);
  const signedIn = Boolean(storedCredential());
  $("sign-out").hidden = !signedIn;
  $("sign-in").classList.toggle("signed-in", signedIn);
}

function describeCredential(credential) {
  if (credential.kind === "token") {
    const subject = tokenSubject(credential.value);
    return subject ? `signed in as ${subject}` : "signed in with a token";
  }
  return "signed in with an API key";
}

async function checkSignIn() {
  const credential = storedCredential();
  serverIsOpen = (await accepted(null)).ok;
  if (serverIsOpen) {
    sessionStorage.removeItem(CREDENTIAL_STORAGE);
    $("sign-in").classList.add("open-server");
    showWho("this server needs no sign-in");
    return true;
  }
  if (credential && (await accepted(credential)).ok) {
    showWho(describeCredential(credential));
    return true;
  }
  sessionStorage.removeItem(CREDENTIAL_STORAGE);
  showWho(credential ? "your sign-in expired: sign in again" : "sign in to generate");
  return false;
}

$("sign-in").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("credential").value.trim();
  if (!text) return;
  const credential = credentialOf(text);
  const verdict = await accepted(credential);
  $("credential").value = "";
  if (!verdict.ok) {
    const what = credential.kind === "token" ? "token" : "key";
    showWho(`${what} refused: ${verdict.detail.message}`, true);
    return;
  }
  if (serverIsOpen) {
    showWho("this server needs no sign-in");
    return;
  }
  sessionStorage.setItem(CREDENTIAL_STORAGE, JSON.stringify(credential));
  showWho(describeCredential(credential));
  await refreshLists();
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(CREDENTIAL_STORAGE);
  for (const id of ["candidates", "derived", "characters", "jobs", "job-references"]) {
    $(id).replaceChildren();
  }
  $("characters-more").hidden = $("jobs-more").hidden = true;
  currentJob = null;
  $("job-state").textContent = "";
  showWho("signed out");
});

// ---------------------------------------------------------------- readiness

// What /ready says, shown before anyone clicks Generate; checked again until ready.
async function checkReady() {
  let readiness;
  try {
    readiness = await (await fetch("/ready")).json();
  } catch {
    readiness = { status: "not ready", problems: ["the server does not answer"], warnings: [] };
  }
  const notes = readiness.status === "not ready" ? readiness.problems : readiness.warnings;
  $("ready-banner").hidden = readiness.status === "ready";
  $("ready-banner").className = readiness.status === "not ready" ? "not-ready" : "degraded";
  $("ready-title").textContent = readiness.status === "not ready"
    ? "Generation cannot run on this server yet:"
    : "Generation works, with warnings:";
  $("ready-problems").replaceChildren(
    ...(notes || []).map((note) => {
      const item = document.createElement("li");
      item.textContent = note;
      return item;
    }),
  );
  if (readiness.status !== "ready") setTimeout(checkReady, READY_RECHECK_MS);
}

// -------------------------------------------------------------------- errors

function fieldName(loc) {
  const name = loc[loc.length - 1];
  return FIELD_LABELS[name] || loc.filter((part) => part !== "body" && part !== "query").join(".");
}

function showError(error) {
  const box = $("error");
  box.replaceChildren();
  for (const input of document.querySelectorAll("[aria-invalid]")) {
    input.removeAttribute("aria-invalid");
  }
  if (!error) {
    box.hidden = true;
    return;
  }
  const detail = error instanceof ApiError
    ? error.detail
    : { error: "NetworkError", message: String(error.message || error) };
  const title = document.createElement("strong");
  const fields = Array.isArray(detail.fields) && detail.fields.length ? detail.fields : null;
  if (fields) {
    // The message repeats the fields; each is said once, by the name the page gives it.
    title.textContent = "Please check:";
    const list = document.createElement("ul");
    for (const field of fields) {
      const item = document.createElement("li");
      item.className = "field-error";
      item.textContent = `${fieldName(field.loc)}: ${field.message}`;
      list.append(item);
      const name = field.loc[field.loc.length - 1];
      document.querySelector(`[name="${name}"]`)?.setAttribute("aria-invalid", "true");
    }
    box.append(title, list);
  } else {
    title.textContent = `${detail.error}: `;
    box.append(title, document.createTextNode(detail.message));
  }
  box.hidden = false;
}

// ---------------------------------------------------------------- image cards

function button(label, className, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.className = className;
  element.addEventListener("click", async () => {
    element.disabled = true;
    try {
      showError(null);
      await onClick();
    } catch (error) {
      showError(error);
    } finally {
      element.disabled = false;
    }
  });
  return element;
}

function captionOf(image) {
  const seed = image.seed === null || image.seed === undefined ? "uploaded" : `seed ${image.seed}`;
  return image.view ? `${image.view} · ${seed}` : seed;
}

function card(image, caption, actions, title = caption) {
  const figure = document.createElement("div");
  figure.className = "card";
  figure.dataset.imageId = image.id || image.image_id;
  const link = document.createElement("a");
  link.href = image.url;
  link.target = "_blank";
  link.rel = "noopener";
  const thumbnail = document.createElement("img");
  thumbnail.src = image.thumbnail_url;
  thumbnail.alt = title;
  thumbnail.loading = "lazy";
  link.append(thumbnail);
  const label = document.createElement("div");
  label.className = "caption";
  label.textContent = caption;
  label.title = title;
  const bar = document.createElement("div");
  bar.className = "actions";
  bar.append(...actions);
  figure.append(link, label, bar);
  return figure;
}

function imageCard(image, caption = captionOf(image)) {
  const title = image.character_description
    ? `${caption}: ${image.character_description}`
    : caption;
  return card(image, caption, [
    button("Pick", "pick", () => pick(image)),
    button("More", "secondary more", () => moreOf(image)),
    button("Delete", "danger delete", () => deleteWithUndo(image, caption)),
  ], title);
}

// --------------------------------------------------------------- generation

function setProgress(text, fraction) {
  $("progress-box").hidden = false;
  $("status").textContent = text;
  if (fraction === null) $("progress").removeAttribute("value");
  else $("progress").value = fraction;
}

function showQueued(position) {
  setProgress(`queued (position ${position ?? "?"})`, null);
}

function showStep(step, total, fraction) {
  setProgress(`step ${step} of ${total}`, fraction);
}

function outcome(status) {
  if (status.status === "succeeded") return status.result;
  if (status.status === "failed") throw new ApiError(status.error.status_code, status.error);
  throw new Error("the generation was canceled");
}

// Polling: only where the event stream cannot be opened.
async function poll(statusUrl) {
  for (;;) {
    const status = await api("GET", statusUrl);
    if (["succeeded", "failed", "canceled"].includes(status.status)) return outcome(status);
    if (status.status === "queued") showQueued(status.queue_position);
    else if (status.progress) {
      showStep(status.progress.step, status.progress.total_steps, status.progress.fraction);
    } else setProgress("starting", null);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// The generation's events, pushed by the server: queued, progress, then how it ended. The
// browser reconnects by itself (sending Last-Event-ID); a stream refused outright, or one
// that never delivers an event, falls back to polling.
function follow(submitted) {
  if (typeof EventSource !== "function" || !submitted.events_url) {
    return poll(submitted.status_url);
  }
  return new Promise((resolve, reject) => {
    const source = new EventSource(submitted.events_url);
    let heard = false;
    let failures = 0;
    const settle = (status) => {
      source.close();
      try {
        resolve(outcome(status));
      } catch (error) {
        reject(error);
      }
    };
    source.addEventListener("queued", (event) => {
      heard = true;
      showQueued(JSON.parse(event.data).queue_position);
    });
    source.addEventListener("progress", (event) => {
      heard = true;
      const progress = JSON.parse(event.data);
      showStep(progress.step, progress.total_steps, progress.fraction);
    });
    for (const name of ["succeeded", "failed", "canceled"]) {
      source.addEventListener(name, (event) => settle(JSON.parse(event.data)));
    }
    source.addEventListener("error", () => {
      failures += 1;
      if (source.readyState === EventSource.CLOSED || (!heard && failures >= STREAM_ATTEMPTS)) {
        source.close();
        poll(submitted.status_url).then(resolve, reject);
      }
    });
  });
}

// Submit an asynchronous generation and follow it; its result, or null after an error shown.
async function runGeneration(body, go, what) {
  go.disabled = true;
  showError(null);
  try {
    setProgress("submitting", null);
    const submitted = await api("POST", `${API}/character_reference_jobs`, body);
    const result = await follow(submitted);
    const meta = result.metadata;
    const made = meta.num_images_generated;
    setProgress(`${made} ${what}${made === 1 ? "" : "s"} in ${meta.generation_time_ms} ms`, 1);
    loadCharacters(); // the new images lead the gallery
    return result;
  } catch (error) {
    $("progress-box").hidden = true;
    showError(error);
    return null;
  } finally {
    go.disabled = false;
  }
}

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {
    character_description: $("description").value,
    num_images: Number($("count").value),
    aspect_ratio: $("aspect").value,
    include_base64: false,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const result = await runGeneration(body, $("generate"), "candidate");
  if (result) $("candidates").replaceChildren(...result.images.map((image) => imageCard(image)));
});

// ------------------------------------------------------ more of a character

let moreReference = null;

function moreOf(image) {
  moreReference = image;
  $("more-reference").textContent = `the character of ${captionOf(image)}`;
  $("more-panel").hidden = false;
  $("more-panel").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

$("more-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!moreReference) return;
  const scene = $("more-kind").value === "scene";
  const description = $("more-scene").value.trim();
  const body = {
    character_description: scene ? description : "the same character",
    reference_image_ids: [moreReference.id],
    aspect_ratio: $("aspect").value,
    include_base64: false,
  };
  if (scene) body.num_images = 1;
  else body.views = "turnaround";
  const result = await runGeneration(body, $("more-generate"), "image");
  if (!result) return;
  const from = (result.metadata.reference_image_ids || []).map((id) => id.slice(0, 8));
  $("derived").prepend(
    ...result.images.map((image) =>
      card(image, `${image.view || "scene"} · from ${from.join(", ")}`, [
        button("Pick", "pick", () => pick(image)),
      ])
    ),
  );
});

// ---------------------------------------------------------- delete, with undo

// A deletion waits UNDO_MS before it is sent, its cards hidden; Undo puts them back. One
// waits at a time (a second sends the first), and leaving the page sends it.
let pendingDelete = null;

function deleteWithUndo(image, caption) {
  sendPendingDelete();
  const removed = [...document.querySelectorAll(`.card[data-image-id="${image.id}"]`)].map(
    (node) => ({ node, parent: node.parentNode, next: node.nextSibling }),
  );
  for (const { node } of removed) node.remove();
  pendingDelete = { image, removed, timer: setTimeout(sendPendingDelete, UNDO_MS) };
  $("toast-text").textContent = `Deleted ${caption}.`;
  $("toast").hidden = false;
}

// The cards go back where they were; the gallery, which may have reloaded meanwhile, reloads.
function restore(pending) {
  for (const { node, parent, next } of pending.removed) {
    if (parent === $("characters")) continue;
    parent.insertBefore(node, next && next.parentNode === parent ? next : null);
  }
  loadCharacters();
}

function takePendingDelete() {
  const pending = pendingDelete;
  pendingDelete = null;
  $("toast").hidden = true;
  if (pending) clearTimeout(pending.timer);
  return pending;
}

async function sendPendingDelete() {
  const pending = takePendingDelete();
  if (!pending) return;
  try {
    await api("DELETE", `${API}/character_references/${pending.image.id}`);
    loadCharacters();
  } catch (error) {
    restore(pending);
    showError(error);
  }
}

$("undo").addEventListener("click", () => {
  const pending = takePendingDelete();
  if (pending) restore(pending);
});

window.addEventListener("pagehide", () => {
  const pending = takePendingDelete();
  if (!pending) return;
  fetch(`${API}/character_references/${pending.image.id}`, {
    method: "DELETE",
    headers: credentialHeaders(storedCredential()),
    keepalive: true, // outlives the page
  });
});

// ---------------------------------------------------------------------- job

let currentJob = null;

async function openJob(jobId) {
  let job;
  if (!jobId) {
    job = await api("POST", `${API}/jobs`, {});
  } else {
    try {
      job = await api("GET", `${API}/jobs/${encodeURIComponent(jobId)}`);
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 404) throw error;
      job = await api("POST", `${API}/jobs`, { job_id: jobId });
    }
  }
  loadJobs();
  await showJob(job);
  return job;
}

// A job's references, labelled as the gallery labels them (not by storage path).
async function showJob(job) {
  currentJob = job.job_id;
  $("job-id").value = job.job_id;
  const query = new URLSearchParams({ job_id: job.job_id, limit: "100" });
  const page = await api("GET", `${API}/character_references?${query}`);
  $("job-state").textContent = `job ${job.job_id}: ${page.items.length} reference(s)`;
  $("job-references").replaceChildren(
    ...page.items.map((image) => card(image, captionOf(image), [], image.character_description)),
  );
  for (const item of document.querySelectorAll("#jobs li")) {
    item.classList.toggle("current", item.dataset.jobId === job.job_id);
  }
}

async function pick(image) {
  const typed = $("job-id").value.trim();
  const jobId = currentJob && typed === currentJob ? currentJob : (await openJob(typed)).job_id;
  const job = await api("POST", `${API}/jobs/${encodeURIComponent(jobId)}/character_references`, {
    image_ids: [image.id],
  });
  await showJob(job);
  document.querySelector(`.card[data-image-id="${image.id}"]`)?.classList.add("picked");
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError(null);
  try {
    await openJob($("job-id").value.trim());
  } catch (error) {
    showError(error);
  }
});

// -------------------------------------------------------------- your lists

// One paged list: the first page replaces what is shown, "show more" appends the next.
function pagedList({ path, pageSize, list, more, render, empty, hide = () => false }) {
  let cursor = null;
  let generation = 0; // a reload started while a page loads wins
  async function load(next) {
    const mine = next ? generation : ++generation;
    const query = new URLSearchParams({ limit: String(pageSize) });
    if (next) query.set("cursor", cursor);
    const page = await api("GET", `${path}?${query}`);
    if (mine !== generation) return;
    const shown = page.items.filter((item) => !hide(item)).map(render);
    if (next) list.append(...shown);
    else list.replaceChildren(...shown);
    cursor = page.next_cursor;
    more.hidden = cursor === null;
    if (empty) empty.hidden = list.children.length > 0;
  }
  more.addEventListener("click", () => load(true).catch(showError));
  return () => load(false).catch(showError);
}

function jobItem(job) {
  const item = document.createElement("li");
  item.dataset.jobId = job.job_id;
  item.classList.toggle("current", job.job_id === currentJob);
  const open = button(job.job_id, "link", () => openJob(job.job_id));
  const created = document.createElement("span");
  created.className = "muted";
  created.textContent = new Date(job.created_at).toLocaleString();
  item.append(open, created);
  return item;
}

const loadCharacters = pagedList({
  path: `${API}/character_references`,
  pageSize: CHARACTERS_PAGE,
  list: $("characters"),
  more: $("characters-more"),
  render: (image) => imageCard(image),
  empty: $("characters-empty"),
  hide: (image) => pendingDelete !== null && pendingDelete.image.id === image.id,
});

const loadJobs = pagedList({
  path: `${API}/jobs`,
  pageSize: JOBS_PAGE,
  list: $("jobs"),
  more: $("jobs-more"),
  render: jobItem,
  empty: $("jobs-empty"),
});

async function refreshLists() {
  await Promise.all([loadCharacters(), loadJobs()]);
}

// ------------------------------------------------------------------- start

checkReady();
checkSignIn().then((signedIn) => signedIn && refreshLists(), showError);
