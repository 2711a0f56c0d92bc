"""The engine: what ``streamline(...)`` needs. The API and its handle (``api``), the stage loop with cut
points (``stages``), slices, groups and exact norm statistics (``slicing``), the planner (``plan``), the
memory tracker (``memory``), the per-run context (``context``) and one adapter per model family
(``arch``). It imports no feature, no tool and no ComfyUI."""
