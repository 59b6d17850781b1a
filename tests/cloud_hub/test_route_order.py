"""The requests router is tried first (most of the traffic: the DSO's POSTs and polls), and that changes no
answer: none of its paths is also a path of another route of the app, in either direction, so whichever order
FastAPI tries them in, each HTTP request reaches the same endpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.routing import compile_path

from cloud_hub.api import requests
from cloud_hub.app import create_app
from cloud_hub.settings import HubSettings


def leaves(routes: list[Any]) -> list[Any]:
    """Every route with a ``path``, through the included routers."""
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            out += leaves(inner.routes)
        elif getattr(r, "path", None):
            out.append(r)
    return out


def sample(path: str) -> str:
    """A concrete path of a template: every parameter filled in."""
    return re.sub(r"{[^}]+}", "x1", path)


def test_the_requests_router_comes_first_and_shares_no_path_with_any_other_route(tmp_path: Path) -> None:
    app = create_app(HubSettings(db_path=tmp_path / "hub.db", tokens_file=tmp_path / "tokens.json"))
    included = [r for r in app.routes if getattr(r, "original_router", None) is not None]
    assert included[0].original_router is requests.router
    mine = leaves(requests.router.routes)
    others = [r for r in leaves(app.routes) if all(r is not m for m in mine)]
    assert len(mine) >= 8 and len(others) >= 30
    for m in mine:
        m_re = compile_path(m.path)[0]
        for o in others:
            o_re = compile_path(o.path)[0]
            assert not m_re.match(sample(o.path)), f"{m.path} would answer {o.path}"
            assert not o_re.match(sample(m.path)), f"{o.path} would answer {m.path}"
