"""``gradcam serve``: an explanation service, a web app and the Grad-CAM paper's trust study, on one
FastAPI application (:func:`gradcam.serve.app.create_app`).

- API: ``GET /healthz``, ``GET /v1/models``, ``GET /v1/models/{model}/labels``, ``GET /v1/methods``,
  ``POST /v1/explain`` and ``POST /v1/compare`` (multipart); the OpenAPI schema at ``/openapi.json``
  documents every field and error. Errors are ``{"detail": "<one line>"}``.
- Web app at ``/`` (static files, no build step); study pages under ``/studies/{id}``.
- Models are loaded once at start; explanations run in a bounded thread pool, micro-batched per model,
  method and layer (:mod:`gradcam.serve.batcher`).
- Hostile input: bodies over ``max_upload`` are refused with 413 as soon as their declared or streamed
  size passes the limit; images over ``max_pixels`` 413 before decoding; non-images 415; corrupt images
  and bad fields 422. No client string becomes a path.
"""
