"""The DSO page: HTML, script and stylesheet served by :mod:`dso_console.app` (no build step, no external asset)."""
