"""Repo-wide pytest wiring only.

Markers and options live in pyproject.toml and the servelab plugin. The plugin is normally
registered by the package's `pytest11` entry point; when servelab is importable but not
installed (a bare checkout on a device machine with PYTHONPATH=src), register it here.
"""

from __future__ import annotations

from importlib.metadata import entry_points

# pytester drives the plugin tests (tests/test_plugin.py, tests/test_server.py).
pytest_plugins = ["pytester"]
if not entry_points(group="pytest11", name="servelab"):
    pytest_plugins.append("servelab.plugin")
