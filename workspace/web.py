"""The workspace's pages, mounted in the registry's FastAPI app under ``/ui/workspace`` (see :func:`mount`).

Same sign-in, session cookie and CSRF token as the registry's pages (``devices.registry.web``): a physio signs in
once and lands on Today. Every read goes through the registry's service with her actor, so another clinic's
patient or episode answers 404 like one that does not exist. Forms post back and redirect (POST/redirect/GET) with
a one-shot flash message; a refused action re-renders the page with the field at fault marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import select

from devices.registry import web as registry_web
from devices.registry.errors import RegistryError
from devices.registry.service import Registry
from monitor import actions as acts
from monitor.state import Episode
from workspace import formats, ranking
from workspace.patient import ActionForm, PatientPages
from workspace.readmodel import Sources, today_rows

UI: Final = registry_web.UI
BASE: Final = f"{UI}/workspace"
TODAY: Final = f"{BASE}/"
_HERE: Final = Path(__file__).parent
Session = Annotated[registry_web.WebSession, Depends(registry_web.current_session)]


@dataclass
class Workspace:
    """What the pages read and write: the registry, the monitor's state, InfluxDB (for one patient's series)."""

    sources: Sources
    pages: PatientPages


def patient_path(code: str) -> str:
    """The workspace page of one patient (e-mails link here; the sign-in page sends the physio back to it)."""
    return f"{BASE}/patients/{quote(code, safe='')}"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    env.globals.update(UI=UI, BASE=BASE, CSRF_FIELD=registry_web.CSRF_FIELD, patient_path=patient_path,
                       SHOWS=ranking.SHOWS)  # fmt: skip
    formats.install(env)
    return env


def _workspace(request: Request) -> Workspace:
    found = request.app.state.workspace
    assert isinstance(found, Workspace)
    return found


def _clinic(registry: Registry, session: registry_web.WebSession) -> tuple[str, ZoneInfo]:
    clinics = registry.list_clinics(session.actor)
    return (clinics[0].name, ZoneInfo(clinics[0].timezone)) if clinics else ("", ZoneInfo("UTC"))


def _view(scope: str, show: str, kind: str, q: str, sort: str, dir: str) -> ranking.View:
    return ranking.View(everyone=scope == "all", show=show if show in ranking.SHOWS else "all",
                        kind=kind if kind in ("sock", "boot") else "", query=q[:100],
                        sort=sort if sort in ranking.COLUMNS else "need",
                        direction="desc" if dir == "desc" else "asc")  # fmt: skip


def _link(view: ranking.View, **changes: str) -> str:
    """Today's address with the view's choices, some changed."""
    params = {"scope": "all" if view.everyone else "mine", "show": view.show, "kind": view.kind, "q": view.query,
              "sort": view.sort, "dir": view.direction} | changes  # fmt: skip
    kept = {k: v for k, v in params.items() if v and (k, v) not in (("scope", "mine"), ("show", "all"),
                                                                     ("sort", "need"), ("dir", "asc"))}  # fmt: skip
    return TODAY + (f"?{urlencode(kept)}" if kept else "")


def _sort_link(view: ranking.View, column: str) -> str:
    if view.sort == column:
        return _link(view, sort=column, dir="asc" if view.direction == "desc" else "desc")
    return _link(view, sort=column, dir=ranking.WORST_FIRST.get(column, "asc"))


def _counts(rows: list[Any]) -> dict[str, int]:
    return {"all": len(rows), "attention": sum(1 for r in rows if r.need > 0),
            "unhandled": sum(1 for r in rows if ranking.unhandled(r) > 0),
            "urgent": sum(1 for r in rows if any(e.severity == "critical" for e in r.episodes))}  # fmt: skip


def mount(app: FastAPI, workspace: Workspace) -> None:
    """Add the workspace's pages and stylesheet to ``app`` (which already has the registry's, see
    ``devices.registry.web.mount``); Today becomes the home page after sign-in."""
    app.state.workspace = workspace
    app.state.home_path = TODAY
    app.mount(f"{BASE}/static", StaticFiles(directory=_HERE / "static"), name="workspace-static")
    app.include_router(_router(Jinja2Templates(env=_environment())))


def _router(templates: Jinja2Templates) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def page(request: Request, name: str, context: dict[str, Any], session: registry_web.WebSession,
             status: int = 200) -> Response:  # fmt: skip
        flash = registry_web.take_flash(request)
        response = templates.TemplateResponse(request, name, {"session": session, "flash": flash, **context},
                                              status_code=status)  # fmt: skip
        response.headers["Cache-Control"] = "no-store"
        if flash:
            registry_web.forget_flash(response, request)
        return response

    def refused(request: Request, session: registry_web.WebSession, status: int, message: str) -> Response:
        return page(request, "error.html", {"status": status, "message": message}, session, status)

    @router.get(BASE)
    @router.get(TODAY)
    def today(request: Request, session: Session, scope: str = "mine", show: str = "all", kind: str = "",
              q: str = "", sort: str = "need", dir: str = "asc") -> Response:  # fmt: skip
        ws = _workspace(request)
        view = _view(scope, show, kind, q, sort, dir)
        try:
            clinic, zone = _clinic(ws.sources.registry, session)
            now = ranking.now_utc()
            rows = today_rows(ws.sources, session.actor, session.email, view.everyone, now.astimezone(zone).date(),
                              now)  # fmt: skip
        except RegistryError as exc:
            return refused(request, session, exc.status, str(exc))
        ranked = ranking.ranked(rows)
        shown = ranking.arrange(rows, view)
        context = {"rows": shown, "view": view, "counts": _counts(ranked), "clinic": clinic, "zone": zone,
                   "link": lambda **kw: _link(view, **kw), "sort_link": lambda c: _sort_link(view, c),
                   "now": now}  # fmt: skip
        return page(request, "today.html", context, session)

    @router.get(f"{BASE}/patients/{{code}}")
    async def patient(request: Request, code: str, session: Session, days: int = 42) -> Response:
        ws = _workspace(request)
        try:
            context = await ws.pages.context(session, code, days)
        except RegistryError as exc:
            return refused(request, session, exc.status, str(exc))
        return page(request, "patient.html", context, session)

    @router.post(f"{BASE}/episodes/{{episode_id}}/actions")
    async def act(request: Request, episode_id: int, session: Session) -> Response:
        form = await request.form()
        if not registry_web.csrf_ok(session.csrf, form.get(registry_web.CSRF_FIELD)):
            return refused(request, session, 403, "This form did not come from this page (missing or wrong CSRF "
                                                  "token); nothing was recorded. Reload the page and try again.")
        ws = _workspace(request)
        sent = ActionForm.from_form(episode_id, {k: v for k, v in form.items() if isinstance(v, str)})
        episode = await anyio.to_thread.run_sync(_episode, ws, episode_id)
        if episode is None:
            return refused(request, session, 404, f"no episode {episode_id}")
        try:
            done = await ws.pages.act(session, episode, sent)
        except RegistryError as exc:
            return refused(request, session, exc.status, str(exc))
        except acts.ActionError as exc:
            context = await ws.pages.context(session, episode.patient, 42, failed=(sent, exc))
            return page(request, "patient.html", context, session, 422)
        target = f"{patient_path(episode.patient)}#episode-{episode_id}"
        return registry_web.redirect(target, request, done)

    return router


def _episode(ws: Workspace, episode_id: int) -> Episode | None:
    with ws.sources.state.transaction() as session:
        return session.scalars(select(Episode).where(Episode.id == episode_id)).first()
