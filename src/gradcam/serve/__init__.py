"""``gradcam serve``: an explanation service, a web app and the Grad-CAM paper's trust study, on one
FastAPI application (:func:`gradcam.serve.app.create_app`). HTTP only: the work is done by the library
(:mod:`gradcam.serve.render` over the methods, :mod:`gradcam.study` for the study).

- API: ``GET /healthz``, ``GET /v1/models``, ``GET /v1/models/{model}/labels``, ``GET /v1/methods``,
  ``POST /v1/explain`` and ``POST /v1/compare`` (multipart); the study's calls (raters and admin); the
  OpenAPI schema at ``/openapi.json`` documents every field and error. Errors are ``{"detail": "<one
  line>"}``, mapped from the domain's errors once (:mod:`.errors`).
- Layout: :mod:`.app` (the factory), :mod:`.settings`, :mod:`.dependencies` (shared resources on
  ``app.state``, the admin check), :mod:`.errors`, :mod:`.routers` (``explain``, ``study``, ``admin``,
  ``pages``), :mod:`.batcher`, :mod:`.limits`, :mod:`.render`, :mod:`.schemas` and
  :mod:`.study_schemas`, ``static/`` (the web app).
- Web app at ``/`` (static files, no build step); study pages under ``/studies/{id}``. The service sends
  each class map as a heatmap; the browser draws it over the picture.
- Models are loaded once at start; explanations run in a bounded thread pool, micro-batched per model,
  method and layer (:mod:`gradcam.serve.batcher`). A study is rendered by one background worker
  (:mod:`gradcam.study.jobs`): ``POST /v1/studies`` answers 202 at once.
- Hostile input: bodies over ``max_upload`` are refused with 413 as soon as their declared or streamed
  size passes the limit, bodies that stall 408 (:mod:`.limits`); uploads are read as JPEG, PNG, WebP,
  GIF, BMP or TIFF only (others 415), images over ``max_pixels`` 413 before any pixel is made, and the
  pixels decoded at once are bounded (503 with Retry-After beyond); corrupt images and bad fields 422.
  No client string becomes a path.
- The study's raters come by invitation (a token in the link's URL fragment, sent as ``Authorization:
  Bearer``, never in a URL) or, in an open study, join a few per client address; they may rate only the
  pair served to them. A database that cannot be reached or written is a one-line 503, and
  ``/healthz`` reads it.
"""
