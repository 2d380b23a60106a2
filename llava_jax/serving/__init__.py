"""The OpenAI-compatible server behind `python -m llava_jax.serve`.

    engine.py       the slot scheduler: continuous batching over one batched KV cache (one JAX thread)
    slot_ops.py     its jitted programs: join a prefilled row, shift rows, decode with per-row sampling
    image_cache.py  the LRU of image embeddings (content hash + encoder settings, bounded in bytes)
    chat.py         OpenAI messages → prompt segments in the model's chat template
    media.py        image_url parts → image bytes (data: URIs, file:// under --media-path, http(s))
    schemas.py      the pydantic request models
    metrics.py      the counters and the Prometheus text of /metrics
    app.py          the FastAPI app (endpoints, limits, API key, errors as OpenAI's error object)
"""
