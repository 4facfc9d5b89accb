"""The GPU worker tier: a Ray Serve application that turns prompts into encoded images.

- `deployments`: WorkerIngress (the internal HTTP API) and DiffusionWorker (one pipeline per
  GPU, requests batched across callers with @serve.batch);
- `app`: `build_app`, the application builder that `serve run`, `serve deploy` and
  `make worker` use, configured from the same settings as the API;
- `__main__`: `make worker`, a single-node cluster on this machine;
- `serve_config.yaml`: a config for `serve deploy` on a real cluster.

API replicas reach it through `services.generation.generators.worker` and never import Ray.
"""
