"""Benches: latency and cut costs on the CPU (``unet``), full-size models on a GPU (``cuda``), the hosts'
chunked decodes (``decode``), Step Rehash against the field (``rehash``, and inside ComfyUI: ``rehash_comfyui``)."""
