"""A tiny SVD built the way ComfyUI builds one, its conditioning, how host tests compare latents, and the
Step Rehash nodes' inputs and report."""

# the graphs the reliability self-test runs, shared with the host tests
from streamlined_core.tools.selftest.comfy_graph import (  # noqa: F401
    LATENT_TOL,
    SVD_CONFIG,
    build_svd,
    build_svd_vae,
    conditioning,
    ksample,
    rehash_options,
    rel,
)


def rehash_report(caplog) -> str:
    """The last run's Step Rehash report in the log."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Step Rehash: ")]
    assert lines, "Step Rehash logged no report"
    return lines[-1]


def calibration_folder(path):
    """Step Rehash's calibration folder (models/streamline_rehash) pointed at ``path`` for the block."""
    from streamlined_core.host.comfyui import model_folder

    return model_folder("streamline_rehash", path, {".json"})
