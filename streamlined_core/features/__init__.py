"""Features built on the engine: Step Rehash (``rehash``) and the VRAM profiler's recorder and timeline
(``profiler``). They import no tool."""
