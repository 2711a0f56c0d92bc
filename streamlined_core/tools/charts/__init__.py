"""Charts: the memory timeline (``profile``), Step Rehash's maps and bench plot (``rehash``), and the
self-contained HTML page with the panel's charts (``report``)."""
