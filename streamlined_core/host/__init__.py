"""ComfyUI glue that is not a node: finding a ComfyUI checkout and loading it and this pack's nodes into
a Python process (``comfyui``), for the tools and the tests."""
