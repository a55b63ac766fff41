"""The physios' web page (server-rendered HTML), served by the registry API."""

from __future__ import annotations

from fastapi import FastAPI


def mount(app: FastAPI) -> None:
    """Add the web page's routes to ``app`` (being written: no routes yet)."""
