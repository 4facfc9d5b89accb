// Character studio: describe, generate (async route + polling), make more of a picked
// character from its reference (turnaround sheet or scene), pick into a job, delete.
// Plain browser JavaScript against the REST API; every error reply has one shape:
// {"detail": {"error", "message", "fields"?: [{"loc", "message"}]}}.
"use strict";

const API = "/api/mv";
const KEY_STORAGE = "mv.apiKey"; // sessionStorage: typed once per tab, gone when it closes
const POLL_MS = 400;

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, detail) {
    super(detail.message);
    this.status = status;
    this.detail = detail;
  }
}

async function api(method, path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers["X-API-Key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const reply = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
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

function showError(error) {
  const box = $("error");
  box.replaceChildren();
  if (!error) {
    box.hidden = true;
    return;
  }
  const detail = error instanceof ApiError
    ? error.detail
    : { error: "NetworkError", message: String(error.message || error) };
  const title = document.createElement("strong");
  title.textContent = `${detail.error}: `;
  box.append(title, document.createTextNode(detail.message));
  if (Array.isArray(detail.fields)) {
    const list = document.createElement("ul");
    for (const field of detail.fields) {
      const item = document.createElement("li");
      item.className = "field-error";
      item.textContent = `${field.loc.join(".")}: ${field.message}`;
      list.append(item);
    }
    box.append(list);
  }
  box.hidden = false;
}

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

function card(image, caption, actions) {
  const figure = document.createElement("div");
  figure.className = "card";
  figure.dataset.imageId = image.id || image.image_id;
  const link = document.createElement("a");
  link.href = image.url;
  link.target = "_blank";
  link.rel = "noopener";
  const thumbnail = document.createElement("img");
  thumbnail.src = image.thumbnail_url;
  thumbnail.alt = caption;
  thumbnail.loading = "lazy";
  link.append(thumbnail);
  const bar = document.createElement("div");
  bar.className = "actions";
  const label = document.createElement("span");
  label.textContent = caption;
  bar.append(label, ...actions);
  figure.append(link, bar);
  return figure;
}

// ------------------------------------------------------------------ API key

function showKeyState() {
  $("key-state").textContent = sessionStorage.getItem(KEY_STORAGE)
    ? "key kept for this tab"
    : "no key";
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  showKeyState();
});

// --------------------------------------------------------------- generation

function setProgress(text, fraction) {
  $("progress-box").hidden = false;
  $("status").textContent = text;
  if (fraction === null) $("progress").removeAttribute("value");
  else $("progress").value = fraction;
}

async function waitFor(statusUrl) {
  for (;;) {
    const status = await api("GET", statusUrl);
    if (status.status === "succeeded") return status.result;
    if (status.status === "failed") throw new ApiError(status.error.status_code, status.error);
    if (status.status === "canceled") throw new Error("the generation was canceled");
    if (status.status === "queued") {
      setProgress(`queued (position ${status.queue_position ?? "?"})`, null);
    } else if (status.progress) {
      const { step, total_steps: total, fraction } = status.progress;
      setProgress(`step ${step} of ${total}`, fraction);
    } else {
      setProgress("starting", null);
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function showCandidates(images) {
  const grid = $("candidates");
  grid.replaceChildren(
    ...images.map((image) =>
      card(image, `seed ${image.seed}`, [
        button("Pick", "pick", () => pick(image)),
        button("More", "secondary more", () => moreOf(image)),
        button("Delete", "danger delete", () => removeCandidate(image)),
      ])
    ),
  );
}

// Submit an asynchronous generation and follow it; its result, or null after an error shown.
async function runGeneration(body, go, what) {
  go.disabled = true;
  showError(null);
  try {
    setProgress("submitting", null);
    const submitted = await api("POST", `${API}/character_reference_jobs`, body);
    const result = await waitFor(submitted.status_url);
    const meta = result.metadata;
    setProgress(`${meta.num_images_generated} ${what} in ${meta.generation_time_ms} ms`, 1);
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
  const result = await runGeneration(body, $("generate"), "candidates");
  if (result) showCandidates(result.images);
});

// ------------------------------------------------------ more of a character

let moreReference = null;

function moreOf(image) {
  moreReference = image;
  $("more-reference").textContent = `the candidate with seed ${image.seed}`;
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
  const result = await runGeneration(body, $("more-generate"), "images");
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

async function removeCandidate(image) {
  await api("DELETE", `${API}/character_references/${image.id}`);
  document.querySelector(`#candidates .card[data-image-id="${image.id}"]`)?.remove();
}

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
  showJob(job);
  return job;
}

function showJob(job) {
  currentJob = job.job_id;
  $("job-id").value = job.job_id;
  const references = job.assets.filter((asset) => asset.image_id);
  $("job-state").textContent = `job ${job.job_id}: ${references.length} reference(s)`;
  $("job-references").replaceChildren(
    ...references.map((asset) => card(asset, asset.path, [])),
  );
}

async function pick(image) {
  const typed = $("job-id").value.trim();
  const jobId = currentJob && typed === currentJob ? currentJob : (await openJob(typed)).job_id;
  const job = await api("POST", `${API}/jobs/${encodeURIComponent(jobId)}/character_references`, {
    image_ids: [image.id],
  });
  showJob(job);
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

showKeyState();
