"""Simulators on the meta device: one U-Net call (``unet``), the VAE decode (``decode``), whole workflows
(``pipeline``)."""
