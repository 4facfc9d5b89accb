// Every call of frontend.ts against a live server:
//   node dist/check.js BASE_URL API_KEY local|cloud
// Prints one JSON line naming the calls that passed; exits non-zero at the first that did not.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { ApiError, backend } from "./frontend.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const [baseUrl, apiKey, mode] = process.argv.slice(2);
assert.ok(baseUrl && apiKey && (mode === "local" || mode === "cloud"), "BASE_URL API_KEY MODE");
const api = backend(baseUrl, apiKey);
const passed: string[] = [];

async function header(blob: Blob, length: number): Promise<string> {
  return Buffer.from(await blob.slice(0, length).arrayBuffer()).toString("latin1");
}

async function expectError(call: () => Promise<unknown>): Promise<ApiError> {
  try {
    await call();
  } catch (error) {
    if (error instanceof ApiError) return error;
    throw error;
  }
  assert.fail("the call succeeded");
}

const generation = await api.generate({
  character_description: "a silver metallic humanoid robot with a red shield",
  num_images: 2,
  seed: 7,
  include_base64: false,
});
assert.match(generation.generationId, UUID);
assert.equal(generation.images.length, 2);
assert.deepEqual(
  generation.images.map((image) => image.seed),
  [7, 8],
);
const image = generation.images[0];
assert.ok(image);
assert.equal(generation.metadata.num_images_generated, 2);
passed.push("generate");

const bytes = await api.imageBytes(image.id);
assert.equal(bytes.type, "image/png");
assert.equal(await header(bytes, 8), "\x89PNG\r\n\x1a\n");
passed.push("image bytes");

if (mode === "cloud") {
  const location = await api.imageLocation(image.id);
  assert.equal(location.image_id, image.id);
  assert.equal(location.storage_backend, "s3");
  assert.ok(location.expires_in_seconds > 0);
  passed.push("image location");
}

const thumbnail = await api.thumbnail(image.id, 256);
assert.equal(thumbnail.type, "image/webp");
assert.equal((await header(thumbnail, 12)).slice(8), "WEBP");
passed.push("thumbnail");

const uploaded = await api.upload(bytes, "mine.png", "my own robot");
assert.match(uploaded.id, UUID);
assert.equal(uploaded.size, bytes.size);
assert.equal(uploaded.content_type, "image/png");
passed.push("upload");

const record = await api.metadata(uploaded.id);
assert.equal(record.description, "my own robot");
assert.equal(record.sha256, uploaded.sha256);
assert.equal(record.backend, "upload");
passed.push("metadata");

const jobId = `contract-${mode}-${Date.now()}`;
const created = await api.createJob(jobId, { title: "first video" });
assert.equal(created.job_id, jobId);
assert.equal(created.location, `/api/mv/jobs/${jobId}`);
const attached = await api.attach(jobId, [image.id, uploaded.id]);
assert.deepEqual(
  attached.character_references.map((asset) => asset.image_id).sort(),
  [image.id, uploaded.id].sort(),
);
const job = await api.job(jobId);
assert.deepEqual(job.metadata, { title: "first video" });
assert.equal(job.character_references.length, 2);
passed.push("jobs", "attach");

const submitted = await api.submit({
  character_description: "the same robot, from the side",
  reference_image_ids: [image.id],
  views: ["side"],
  seed: 3,
  backend: "local",
  include_base64: false,
});
assert.match(submitted.generation_id, UUID);
const finished = await api.waitFor(submitted.generation_id);
assert.equal(finished.status, "succeeded");
assert.equal(finished.result?.images[0]?.view, "side");
assert.deepEqual(finished.result?.metadata.reference_image_ids, [image.id]);
passed.push("async submit and poll");

// The server's Replicate never finishes a prediction: this one runs until it is canceled.
const held = await api.submit({
  character_description: "a robot that never finishes",
  backend: "replicate",
  num_images: 1,
});
await api.waitFor(held.generation_id, (status) => status.status === "running");
const canceled = await api.cancel(held.generation_id);
assert.equal(canceled.status, "canceled");
passed.push("cancel");

const streamed = await api.events(held.events_url);
const last = streamed[streamed.length - 1];
assert.equal(last?.event, "canceled");
assert.equal(last?.id, "f");
assert.equal(last?.data.generation_id, held.generation_id);
passed.push("events");

const characters = await api.characters(undefined, 2);
assert.deepEqual(
  characters.items.map((item) => item.id),
  [finished.result?.images[0]?.id, uploaded.id],
);
assert.ok(characters.next_cursor !== null);
const older = await api.characters(characters.next_cursor, 3);
assert.ok(older.items.some((item) => item.id === image.id));
const jobs = await api.jobs();
assert.equal(jobs.items[0]?.job_id, jobId);
const canceledOnes = await api.generations("canceled");
assert.equal(canceledOnes.items[0]?.generation_id, held.generation_id); // the newest
passed.push("lists");

const invalid = await expectError(() => api.generate({ character_description: "" }));
assert.equal(invalid.status, 422);
assert.equal(invalid.error, "ValidationError");
assert.deepEqual(invalid.fields[0]?.loc, ["body", "character_description"]);
const missing = await expectError(() => api.metadata(randomUUID()));
assert.equal(missing.status, 404);
assert.equal(missing.error, "NotFound");
assert.deepEqual(missing.fields, []);
const finishedAlready = await expectError(() => api.cancel(submitted.generation_id));
assert.equal(finishedAlready.error, "AlreadyFinished");
passed.push("error shape");

await api.deleteImage(uploaded.id);
assert.equal((await expectError(() => api.metadata(uploaded.id))).status, 404);
passed.push("delete");

console.log(JSON.stringify({ mode, passed }));
