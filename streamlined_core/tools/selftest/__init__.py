"""The exactness self-test: ``streamline selftest exactness`` (a development command; needs hypothesis)."""
