"""The tools: the ``streamline`` command (``cli``, a dispatcher over ``commands``), the benches (``bench``),
the simulators (``sim``), the charts and the HTML page (``charts``), the model configurations
(``configs``) and the profiled sampling runs (``profiling``). Only the tools import matplotlib."""
