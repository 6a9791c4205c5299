"""Converters from common dataset layouts to clbd shard sets (``{prefix}-NNNNNN.tar`` + ``{prefix}.index.json``).

One module per source layout (``cifar10``, ``image_folder``, ``coco``, ``csv_captions``, ``img2dataset``) on a
shared base: ``images`` checks and re-encodes one image, ``file_tree`` reads a folder or an archive the same way,
``writer`` makes keys, refuses to overwrite and writes a split through ``ShardSink``.

Each converter reads its source in sorted order, checks every image, and writes samples through ``ShardSink``:
``key.jpg`` or ``key.png`` (image bytes), ``key.cls`` (class index, when labelled), ``key.txt`` (caption, when
there is one), ``key.json`` (provenance and all captions, where useful). It returns a small report dict::

    {"converter": ..., "out": ..., "seconds": ...,
     "splits": {"train": {"written": N, "shards": S, "index": PATH, "per_class": {name: n} | None,
                          "skipped": {reason: n}, "converted": {"color_converted": n, ...}}},
     "written": N_total, "skipped": {reason: n}, "converted": {...}}

Images that are already RGB JPEG/PNG keep their original bytes (no quality loss). Other colour modes and formats
are converted to RGB and re-encoded (counted). Undecodable, too small and too large (decompression-bomb) images
are skipped and counted, never a crash. Output is never overwritten unless ``overwrite=True``.
"""
