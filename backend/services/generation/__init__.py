"""Generation, read top-down: what the routes call, down to where pixels are made.

- `service`: GenerationService, the sync and async routes' entry (idempotent, cancelable);
- `queue`: GenerationQueue, the bounded queue both routes share (admission and 429s,
  workers, progress, cancel);
- `records`: each generation's record in the storage tier, for any replica to answer;
- `policy`: GenerationPolicy, which generator runs a request (worker tier, local, Replicate),
  the fallback, overflow and deadline; `build_generation_policy(settings)` wires it;
- `base`: the generator interface, frozen requests and results, progress, errors;
- `generators/`: `local` (the pipeline in this process), `replicate`, `worker` (a client of
  the GPU worker tier, `gpu_worker/`);
- `diffusion`: the pipeline code itself (loading, family defaults, batched calls), shared by
  the local generator and the worker tier; `worker_protocol`: the worker tier's wire format.
"""
