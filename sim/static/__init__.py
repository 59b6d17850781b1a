"""The DSO page: HTML, script and stylesheet served by :mod:`sim.dso_web` (no build step, no external asset)."""
