"""Explaining whole datasets: streaming batches, resumable runs, the manifest, engines.

Layout of an output folder ``OUT`` (input folders mirrored below it, relative to the deepest folder that
holds every input; ``key`` is that relative path in POSIX form):

- ``OUT/<key>_<target>-<class slug>[_<method>]_overlay.png``: the map over the picture (the whole image for
  models that resize the whole frame, the crop otherwise; its longer side at most ``overlay_size``, 384
  pixels by default, 0 for the full picture);
- ``OUT/<key>_<target>-<class slug>[_<method>]_map.npy``: the raw map at the layer's resolution, or with
  ``maps="npz"`` an array named ``<key>#<target>`` in ``OUT/maps/shard-NNNNNN.npz``;
- ``OUT/run.json``: the settings; a run with other settings is refused unless told to overwrite;
- ``OUT/manifest.jsonl``: one JSON object per image and target::

    {"key": "sub/cat.jpg", "image": "<path as found>", "target": 285, "class": "Egyptian cat",
     "probability": 0.77, "score": 10.47, "rank": 0, "of": 1,
     "top5": [{"index": 285, "class": "Egyptian cat", "probability": 0.77}, ...],
     "peak": {"x": 288.9, "y": 149.3}, "box": [x0, y0, x1, y1], "size": [width, height],
     "files": {"overlay": "sub/cat.jpg_285-egyptian-cat_overlay.png", "map": "sub/cat.jpg_285-...npy"}}

  (``rank``: the target's place among the top-5, None below; ``of``: how many targets the image has;
  ``peak`` and ``box``, the map's maximum and its 15% box, in the pixels of the picture of ``size``;
  ``files`` relative to ``OUT``);
- ``OUT/errors.jsonl``: ``{"key", "image", "error"}`` per input that could not be explained.

Engines: :func:`gradcam.batch.local.run_local` (DataLoader workers, one process) and
:mod:`gradcam.batch.ray_engine` (Ray Data, optional extra ``gradcam[ray]``); both write the same files.
"""
