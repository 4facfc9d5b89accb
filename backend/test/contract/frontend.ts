// The backend's API as a frontend module uses it: a client generated from /openapi.json
// (openapi-typescript types, openapi-fetch calls), one error type, no casts.
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";

export type Schemas = components["schemas"];
export type GenerateRequest = Schemas["GenerateCharacterReferenceRequest"];
export type AsyncGenerateRequest = Schemas["AsyncGenerateCharacterReferenceRequest"];
export type Generation = Schemas["GenerateCharacterReferenceResponse"];
export type GenerationStatus = Schemas["GenerationStatus"];
export type Job = Schemas["Job"];
export type ErrorReply = Schemas["ErrorReply"];
export type ErrorName = ErrorReply["detail"]["error"];
export type FieldProblem = Schemas["FieldProblem"];
export type ThumbnailSize = Schemas["ThumbnailSize"];
export type CharacterReferencePage = Schemas["CharacterReferencePage"];
export type JobPage = Schemas["JobPage"];
export type GenerationPage = Schemas["GenerationPage"];
export type GenerationState = GenerationStatus["status"];
/** What an event's `data` line holds: the event stream's declared data schemas. */
export type EventData = Schemas["QueuedEvent"] | Schemas["ProgressEvent"] | GenerationStatus;
export interface GenerationEvent {
  event: string;
  id: string;
  data: EventData;
}

const FINISHED: ReadonlySet<GenerationStatus["status"]> = new Set([
  "succeeded",
  "failed",
  "canceled",
]);

/** An error reply: its status, its stable name, and the invalid fields of a 422. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly reply: ErrorReply,
    readonly retryAfterSeconds: number | null,
  ) {
    super(reply.detail.message);
  }

  get error(): ErrorName {
    return this.reply.detail.error;
  }

  /** The invalid fields of a ValidationError; none for any other error. */
  get fields(): FieldProblem[] {
    const detail = this.reply.detail;
    return detail.error === "ValidationError" ? detail.fields : [];
  }
}

type Result<T> =
  | { data: T; error?: never; response: Response }
  | { data?: never; error: ErrorReply; response: Response };

function unwrap<T>(result: Result<T>): T {
  if (result.error !== undefined) {
    const retryAfter = result.response.headers.get("Retry-After");
    throw new ApiError(
      result.response.status,
      result.error,
      retryAfter === null ? null : Number(retryAfter),
    );
  }
  return result.data;
}

function requiredHeader(response: Response, name: string): string {
  const value = response.headers.get(name);
  if (value === null) throw new Error(`the reply has no ${name} header`);
  return value;
}

/** The calls a character studio makes. */
export function backend(baseUrl: string, apiKey?: string) {
  const client = createClient<paths>({
    baseUrl,
    headers: apiKey === undefined ? {} : { "X-API-Key": apiKey },
  });

  return {
    /** Candidates from a description (or from stored references), stored before the reply. */
    async generate(body: GenerateRequest): Promise<Generation & { generationId: string }> {
      const result = await client.POST("/api/mv/generate_character_reference", { body });
      const generation = unwrap(result);
      return { ...generation, generationId: requiredHeader(result.response, "X-Generation-Id") };
    },

    /** The image's bytes, in either serving mode (cloud serving redirects to the store). */
    async imageBytes(imageId: string): Promise<Blob> {
      const result = await client.GET("/api/mv/get_character_reference/{image_id}", {
        params: { path: { image_id: imageId }, query: { redirect: true } },
        parseAs: "blob",
      });
      return unwrap(result);
    },

    /** Cloud serving: where the image is, and until when that URL works. */
    async imageLocation(imageId: string): Promise<Schemas["CloudImageLocation"]> {
      const result = await client.GET("/api/mv/get_character_reference/{image_id}", {
        params: { path: { image_id: imageId } },
      });
      const location = unwrap(result);
      if (!("image_url" in location)) throw new Error("served as bytes: the server serves locally");
      return location;
    },

    /** A WebP thumbnail of at most `size` px on its long side. */
    async thumbnail(imageId: string, size: ThumbnailSize): Promise<Blob> {
      const result = await client.GET(
        "/api/mv/character_references/{image_id}/thumbnail/{size}",
        { params: { path: { image_id: imageId, size } }, parseAs: "blob" },
      );
      return unwrap(result);
    },

    /** Store the user's own image. */
    async upload(
      file: Blob,
      filename: string,
      description?: string,
    ): Promise<Schemas["UploadedCharacterReference"]> {
      const result = await client.POST("/api/mv/upload_character_reference", {
        body: { file, character_description: description },
        bodySerializer(body) {
          const form = new FormData();
          form.append("file", body.file, filename);
          if (body.character_description !== undefined) {
            form.append("character_description", body.character_description);
          }
          return form;
        },
      });
      return unwrap(result);
    },

    /** How an image was made: its sidecar. */
    async metadata(imageId: string): Promise<Schemas["CharacterReferenceRecord"]> {
      const result = await client.GET("/api/mv/character_references/{image_id}/metadata", {
        params: { path: { image_id: imageId } },
      });
      return unwrap(result);
    },

    async deleteImage(imageId: string): Promise<void> {
      const result = await client.DELETE("/api/mv/character_references/{image_id}", {
        params: { path: { image_id: imageId } },
      });
      unwrap(result);
    },

    /** A video job; `location` is where to read it. */
    async createJob(
      jobId: string,
      metadata: Record<string, unknown>,
    ): Promise<Job & { location: string }> {
      const result = await client.POST("/api/mv/jobs", { body: { job_id: jobId, metadata } });
      const job = unwrap(result);
      return { ...job, location: requiredHeader(result.response, "Location") };
    },

    async job(jobId: string): Promise<Job> {
      const result = await client.GET("/api/mv/jobs/{job_id}", {
        params: { path: { job_id: jobId } },
      });
      return unwrap(result);
    },

    async attach(jobId: string, imageIds: string[]): Promise<Job> {
      const result = await client.POST("/api/mv/jobs/{job_id}/character_references", {
        params: { path: { job_id: jobId } },
        body: { image_ids: imageIds },
      });
      return unwrap(result);
    },

    /** Queue a generation: 202 at once, then poll its status. */
    async submit(body: AsyncGenerateRequest): Promise<GenerationStatus> {
      const result = await client.POST("/api/mv/character_reference_jobs", { body });
      const status = unwrap(result);
      if (requiredHeader(result.response, "Location") !== status.status_url) {
        throw new Error("Location and status_url differ");
      }
      return status;
    },

    async status(generationId: string): Promise<GenerationStatus> {
      const result = await client.GET("/api/mv/character_reference_jobs/{generation_id}", {
        params: { path: { generation_id: generationId } },
      });
      return unwrap(result);
    },

    /** Poll until `until` holds for the status (by default: until it finished). */
    async waitFor(
      generationId: string,
      until: (status: GenerationStatus) => boolean = (status) => FINISHED.has(status.status),
      timeoutMs = 60_000,
    ): Promise<GenerationStatus> {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const status = await this.status(generationId);
        if (until(status)) return status;
        if (Date.now() > deadline) throw new Error(`still ${status.status} after ${timeoutMs} ms`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    },

    /** A page of my characters, newest first (`cursor`: the last page's next_cursor). */
    async characters(cursor?: string, limit = 50): Promise<CharacterReferencePage> {
      const result = await client.GET("/api/mv/character_references", {
        params: { query: { limit, ...(cursor === undefined ? {} : { cursor }) } },
      });
      return unwrap(result);
    },

    /** A page of my jobs, newest first. */
    async jobs(cursor?: string, limit = 50): Promise<JobPage> {
      const result = await client.GET("/api/mv/jobs", {
        params: { query: { limit, ...(cursor === undefined ? {} : { cursor }) } },
      });
      return unwrap(result);
    },

    /** A page of my generations, newest first, optionally only those in one state. */
    async generations(status?: GenerationState, limit = 50): Promise<GenerationPage> {
      const result = await client.GET("/api/mv/character_reference_jobs", {
        params: { query: { limit, ...(status === undefined ? {} : { status }) } },
      });
      return unwrap(result);
    },

    /** Every event of a generation's stream, read to its end (Node has no EventSource). */
    async events(eventsUrl: string): Promise<GenerationEvent[]> {
      const response = await fetch(new URL(eventsUrl, baseUrl), {
        headers: apiKey === undefined ? {} : { "X-API-Key": apiKey },
      });
      if (!response.ok) throw new Error(`the event stream answered ${response.status}`);
      if (!(response.headers.get("content-type") ?? "").startsWith("text/event-stream")) {
        throw new Error("the event stream is not text/event-stream");
      }
      const events: GenerationEvent[] = [];
      for (const block of (await response.text()).split("\n\n")) {
        const fields = new Map<string, string>();
        for (const line of block.split("\n")) {
          if (line === "" || line.startsWith(":")) continue;
          const at = line.indexOf(":");
          fields.set(line.slice(0, at), line.slice(at + 1).trimStart());
        }
        const event = fields.get("event");
        const data = fields.get("data");
        if (event === undefined || data === undefined) continue;
        events.push({ event, id: fields.get("id") ?? "", data: JSON.parse(data) as EventData });
      }
      return events;
    },

    /** Stop a queued or running generation. */
    async cancel(generationId: string): Promise<GenerationStatus> {
      const result = await client.DELETE("/api/mv/character_reference_jobs/{generation_id}", {
        params: { path: { generation_id: generationId } },
      });
      return unwrap(result);
    },
  };
}
