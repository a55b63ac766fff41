"""The physios' web page (server-rendered HTML), served by the registry API under ``/ui/``.

A physio signs in with their e-mail and password (:meth:`Registry.login`), lists
their patients (or the whole clinic's), opens one to see prescriptions, garments,
contraindications and recent audit entries, and edits a prescription's targets.
Every read and write goes through :class:`~devices.registry.service.Registry` with
the physio's :class:`~devices.registry.service.Actor`, so the page sees exactly
what the physio's API token would, and every change is audited by the service.

Session: the token from :meth:`Registry.login` in the ``compression_session``
cookie (HttpOnly, SameSite=Strict, Path=/, Secure when the request came over
https through a trusted proxy or the public URL is https). Password hashing
(sign-in, password change) runs in a worker thread, never on the event loop.
Forms post back and redirect (POST/redirect/GET) with a one-shot flash
message in a cookie. CSRF protection is described at :func:`csrf_token`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import quote, unquote, urlencode
from zoneinfo import ZoneInfo

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from pydantic import ValidationError

from devices.registry import schemas as s
from devices.registry.api import client_address
from devices.registry.errors import (
    ConfirmationNeededError,
    ContraindicatedError,
    ForbiddenError,
    RegistryError,
    ThrottledError,
)
from devices.registry.models import utcnow
from devices.registry.secrets import PASSWORD_MAX_LENGTH, PASSWORD_MIN_LENGTH
from devices.registry.service import SESSION_HOURS, Actor, Registry
from devices.registry.settings import RegistrySettings

UI: Final = "/ui"
SESSION_COOKIE: Final = "compression_session"
LOGIN_COOKIE: Final = "compression_login"  # double-submit CSRF value for the login form (no session yet)
FLASH_COOKIE: Final = "compression_flash"
CSRF_FIELD: Final = "csrf"
# Where a physio lands after signing in: /ui/ sends her on to the app's home page (app.state.home_path: the
# physios' workspace sets its Today page there), else to the patient list.
HOME: Final = f"{UI}/"
PATIENTS: Final = f"{UI}/patients"
_CSRF_LABEL: Final = b"compression-registry-web/csrf/v1"
_HERE: Final = Path(__file__).parent
T = TypeVar("T")

# What the edit form offers per garment kind (the class itself is changed through the API or CLI).
EDITABLE: Final[dict[str, tuple[str, ...]]] = {
    "sock": ("wear_hours_per_day", "wear_days_per_week", "out_of_range_tolerance_minutes", "max_silence_hours"),
    "boot": ("sessions_per_week", "session_min_minutes", "session_max_minutes", "max_chamber_mmhg",
             "out_of_range_tolerance_minutes", "max_silence_hours"),
}  # fmt: skip
ZONE_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "sock": s.SOCK_ZONES,
    "boot": ("foot", "ankle", "calf", "knee", "thigh"),
}
LABELS: Final[dict[str, str]] = {
    "wear_hours_per_day": "Daily wear target (hours/day)",
    "wear_days_per_week": "Wear days per week",
    "sessions_per_week": "Sessions per week",
    "session_min_minutes": "Shortest session (minutes)",
    "session_max_minutes": "Longest session (minutes)",
    "max_chamber_mmhg": "Max chamber pressure (mmHg)",
    "out_of_range_tolerance_minutes": "Out-of-range tolerance (minutes)",
    "max_silence_hours": "Max silence before alert (hours)",
    "zones": "Zones",
    "override_reason": "Override reason",
    "valid_to": "Valid to",
    "class_system": "Class system",
    "class_name": "Class",
}
# Input attributes (min, max, step) so phones show a number pad; the server checks again (forms are novalidate
# so that its message, the one that counts, is what the physio sees).
INPUTS: Final[dict[str, tuple[str, str, str]]] = {
    "wear_hours_per_day": ("0.5", "24", "0.5"),
    "wear_days_per_week": ("1", "7", "1"),
    "sessions_per_week": ("1", "28", "1"),
    "session_min_minutes": ("1", "240", "any"),
    "session_max_minutes": ("1", "240", "any"),
    "max_chamber_mmhg": ("1", "200", "any"),
    "out_of_range_tolerance_minutes": ("0", "1440", "any"),
    "max_silence_hours": ("0.5", "336", "any"),
}


# --- sessions and CSRF ------------------------------------------------------------------------------------------------


def csrf_token(session_token: str) -> str:
    """The CSRF token of a web session: HMAC-SHA256 keyed with the session token over a fixed label.

    Why this is enough, and why it is derived rather than stored: only the browser
    holding the (HttpOnly) session cookie and the server know the session token, so
    only they can compute this value; a page on another site can neither read the
    cookie nor this page, so it cannot put the right value in a forged form. HMAC is
    one-way, so the token in the HTML does not reveal the session token. Deriving it
    needs no storage, survives restarts and dies with the session (logout, expiry,
    new login). It is the second layer: the SameSite=Strict cookie already keeps
    browsers from sending the session on cross-site requests at all.
    """
    return hmac.new(session_token.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def _csrf_ok(expected: str | None, given: object) -> bool:
    return bool(expected) and isinstance(given, str) and hmac.compare_digest(expected or "", given)


@dataclass(frozen=True, slots=True)
class WebSession:
    """The signed-in physio: actor for the registry, the session token, and who they are."""

    actor: Actor
    token: str
    email: str
    name: str

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


class _LoginRequiredError(Exception):
    def __init__(self, next_path: str):
        super().__init__(next_path)
        self.next_path = next_path


def _registry(request: Request) -> Registry:
    registry = request.app.state.registry
    assert isinstance(registry, Registry)
    return registry


def _web_session(request: Request) -> WebSession:
    """The physio behind the session cookie; anyone else is sent to the login page."""
    token = request.cookies.get(SESSION_COOKIE)
    session = _session_of(_registry(request), token) if token else None
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise _LoginRequiredError(target if request.method == "GET" else HOME)
    return session


def _session_of(registry: Registry, token: str) -> WebSession | None:
    try:
        actor = registry.authenticate(token)
    except ForbiddenError:
        return None  # unknown, revoked or expired
    if actor.role != "physio" or actor.physio_id is None:
        return None  # the page is for physios; admins use the API and the CLI
    me = next((p for p in registry.list_physios(actor) if p.id == actor.physio_id), None)
    if me is None:
        return None
    return WebSession(actor, token, me.email, me.name)


Session = Annotated[WebSession, Depends(_web_session)]


def _secure(request: Request) -> bool:
    # https as the browser sees it: the request's scheme (a trusted proxy's X-Forwarded-Proto, see guards.py), or
    # the public URL when that is https (behind a TLS proxy whose hop is plain http).
    settings = request.app.state.settings
    return request.url.scheme == "https" or (isinstance(settings, RegistrySettings) and settings.always_https)


async def _password_work(request: Request, work: Callable[[], T]) -> T:
    """Run ``work`` (it hashes a password: ~50 ms of CPU) in a worker thread, never on the event loop.

    At most ``PASSWORD_WORK_CONCURRENCY`` at once (the app's limiter): the rest of the server keeps a core.
    """
    limiter = request.app.state.password_work
    return await anyio.to_thread.run_sync(work, limiter=limiter)


def _set_cookie(response: Response, request: Request, key: str, value: str, max_age: int | None = None,
                path: str = "/") -> None:  # fmt: skip
    response.set_cookie(key, value, max_age=max_age, path=path, secure=_secure(request), httponly=True,
                        samesite="strict")  # fmt: skip


def _delete_cookie(response: Response, request: Request, key: str, path: str = "/") -> None:
    response.delete_cookie(key, path=path, secure=_secure(request), httponly=True, samesite="strict")


def _redirect(url: str, request: Request | None = None, flash: str | None = None) -> RedirectResponse:
    response = RedirectResponse(url, status_code=303)
    if flash and request is not None:
        _set_cookie(response, request, FLASH_COOKIE, quote(flash), max_age=120, path=UI)
    return response


def _take_flash(request: Request) -> str | None:
    raw = request.cookies.get(FLASH_COOKIE)
    return unquote(raw)[:500] if raw else None


def _safe_next(value: object) -> str:
    # Only our own pages: no scheme, no host, no protocol-relative "//evil".
    if isinstance(value, str) and value.startswith(f"{UI}/") and "//" not in value and "\\" not in value:
        return value
    return HOME


def _home_path(request: Request) -> str:
    home = getattr(request.app.state, "home_path", None)
    return home if isinstance(home, str) and home.startswith(f"{UI}/") else PATIENTS


# --- formatting -------------------------------------------------------------------------------------------------------


def _num(value: object) -> str:
    """8.0 -> '8', 7.5 -> '7.5'; None -> '—'."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _field_value(value: object) -> str:
    return "" if value is None else _num(value)


def rx_summary(rx: s.PrescriptionOut) -> str:
    """One line: class and band with the wear target (sock), or the session plan (boot)."""
    if rx.garment_kind == "boot":
        return (f"Boot: {_num(rx.sessions_per_week)} sessions/week, {_num(rx.session_min_minutes)}–"
                f"{_num(rx.session_max_minutes)} min, max {_num(rx.max_chamber_mmhg)} mmHg")  # fmt: skip
    system = (rx.class_system or "").upper()
    klass = "explicit range" if rx.class_system == "explicit" else f"{system} class {rx.class_name}"
    band = f" ({_num(rx.ankle_min_mmhg)}–{_num(rx.ankle_max_mmhg)} mmHg)" if rx.ankle_min_mmhg else ""
    return (f"Sock: {klass}{band}, {_num(rx.wear_hours_per_day)} h/day, "
            f"{_num(rx.wear_days_per_week)} days/week")  # fmt: skip


def _rx_state(rx: s.PrescriptionOut, today: date) -> str:
    if rx.valid_from > today:
        return "upcoming"
    if rx.valid_to is not None and rx.valid_to < today:
        return "ended"
    return "current"


def _changes_text(changes: Mapping[str, object]) -> str:
    """An audit entry's changes in a line: ``field: before → after`` for updates, ``field=value`` otherwise."""
    before, after = changes.get("before"), changes.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        parts = [f"{LABELS.get(k, k)}: {_plain(before.get(k))} → {_plain(v)}" for k, v in after.items()]
        if changes.get("supersedes"):
            parts.append(f"new version from {_plain(changes.get('effective_from'))}, replacing "
                         f"#{_plain(changes['supersedes'])}")  # fmt: skip
        if changes.get("override_reason"):
            parts.append(f"override: {changes['override_reason']}")
        return "; ".join(parts) or "no fields"
    return "; ".join(f"{k}={_plain(v)}" for k, v in changes.items() if v not in (None, "", [], {}))


def _plain(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value)
    return _num(value)


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    env.filters["num"] = _num
    env.filters["changes"] = _changes_text
    env.tests["about"] = _about  # a refusal's message names its field first: the form marks that field
    env.globals.update(LABELS=LABELS, INPUTS=INPUTS, UI=UI, CSRF_FIELD=CSRF_FIELD,
                       PASSWORD_MIN_LENGTH=PASSWORD_MIN_LENGTH, PASSWORD_MAX_LENGTH=PASSWORD_MAX_LENGTH)  # fmt: skip
    return env


def _about(message: object, label: str) -> bool:
    """Is the form's error ``message`` about the field labelled ``label`` (``"Label: what is wrong"``)?"""
    return str(message).startswith(f"{label}:")


def _local(zone: ZoneInfo) -> Callable[..., str]:
    def fmt(value: datetime | None, missing: str = "—") -> str:
        return value.astimezone(zone).strftime("%Y-%m-%d %H:%M") if value is not None else missing

    return fmt


# --- page data ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class FormState:
    """What a prescription's form shows after a refused POST: the values sent and why they were refused."""

    values: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    needs_override: bool = False
    needs_confirm: bool = False  # raising a boot's maximum pressure: the physio's reason


def _clinic_zone(registry: Registry, actor: Actor) -> tuple[str, ZoneInfo]:
    clinics = registry.list_clinics(actor)
    name = clinics[0].timezone if clinics else "UTC"
    return (clinics[0].name if clinics else ""), ZoneInfo(name)


def _current_assignments(assignments: Sequence[s.AssignmentOut], now: datetime) -> list[s.AssignmentOut]:
    return [a for a in assignments if a.valid_from <= now and (a.valid_to is None or a.valid_to > now)]


# --- routes ---------------------------------------------------------------------------------------------------------


def mount(app: FastAPI) -> None:
    """Add the web page's routes (``/ui/...``, ``/`` redirects there) and its stylesheet to ``app``."""
    templates = Jinja2Templates(env=_environment())
    app.mount(f"{UI}/static", StaticFiles(directory=_HERE / "static"), name="registry-web-static")
    app.include_router(_router(templates))

    @app.exception_handler(_LoginRequiredError)
    def login_required(request: Request, exc: _LoginRequiredError) -> Response:
        response = _redirect(f"{UI}/login?{urlencode({'next': exc.next_path})}")
        if request.cookies.get(SESSION_COOKIE):
            _delete_cookie(response, request, SESSION_COOKIE)  # expired or revoked: forget it
        return response


def _router(templates: Jinja2Templates) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200,
             session: WebSession | None = None) -> Response:  # fmt: skip
        flash = _take_flash(request)
        response = templates.TemplateResponse(request, name, {"session": session, "flash": flash, **context},
                                              status_code=status)  # fmt: skip
        response.headers["Cache-Control"] = "no-store"  # the other security headers: guards.SecurityHeaders
        if flash:
            _delete_cookie(response, request, FLASH_COOKIE, path=UI)
        return response

    def refused(request: Request, session: WebSession | None, status: int, message: str) -> Response:
        return page(request, "error.html", {"status": status, "message": message}, status, session)

    @router.get("/")
    def root() -> Response:
        return _redirect(f"{UI}/")

    @router.get(f"{UI}")
    @router.get(f"{UI}/")
    def home(request: Request) -> Response:
        return _redirect(_home_path(request))

    # --- login and logout ---

    @router.get(f"{UI}/login")
    def login_form(request: Request, next: str = HOME) -> Response:
        token = request.cookies.get(SESSION_COOKIE)
        if token and _session_of(_registry(request), token) is not None:
            return _redirect(_safe_next(next))
        return _login_page(request, _safe_next(next))

    def _login_page(request: Request, next_path: str, email: str = "", error: str | None = None,
                    status: int = 200) -> Response:  # fmt: skip
        # No session yet, so no session token to derive from: a random value in a SameSite=Strict cookie that the
        # form must echo (double submit); a cross-site form can neither read nor set it (login CSRF).
        login_csrf = secrets.token_urlsafe(32)
        response = page(request, "login.html", {"next": next_path, "email": email, "error": error,
                                                "csrf": login_csrf}, status)  # fmt: skip
        _set_cookie(response, request, LOGIN_COOKIE, login_csrf, max_age=3600, path=f"{UI}/login")
        return response

    @router.post(f"{UI}/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        next_path = _safe_next(form.get("next"))
        if not _csrf_ok(request.cookies.get(LOGIN_COOKIE), form.get(CSRF_FIELD)):
            return refused(request, None, 403, "The sign-in form expired or did not come from this site. "
                                               "Open the sign-in page again and retry.")  # fmt: skip
        email, password = str(form.get("email") or "").strip(), str(form.get("password") or "")
        if not email or not password:
            return _login_page(request, next_path, email, "Give your e-mail and password.", 422)
        registry, address = _registry(request), client_address(request)
        try:
            token = await _password_work(request, lambda: registry.login(email, password, address))
        except ThrottledError as exc:
            response = _login_page(request, next_path, email, _sentence(exc), exc.status)
            response.headers["Retry-After"] = str(exc.retry_after_s)
            return response
        except RegistryError as exc:
            return _login_page(request, next_path, email, _sentence(exc), exc.status)
        response = _redirect(next_path)
        _set_cookie(response, request, SESSION_COOKIE, token, max_age=SESSION_HOURS * 3600)
        _delete_cookie(response, request, LOGIN_COOKIE, path=f"{UI}/login")
        return response

    @router.post(f"{UI}/logout")
    async def logout(request: Request, session: Session) -> Response:
        form = await request.form()
        if not _csrf_ok(session.csrf, form.get(CSRF_FIELD)):
            return refused(request, session, 403, "This form did not come from this page; nothing was done.")
        _registry(request).logout(session.token)
        response = _redirect(f"{UI}/login", request, "You are signed out.")
        _delete_cookie(response, request, SESSION_COOKIE)
        return response

    # --- the physio's own password ---

    @router.get(f"{UI}/account/password")
    def password_form(request: Request, session: Session) -> Response:
        return page(request, "password.html", {"errors": [], "done": False}, 200, session)

    @router.post(f"{UI}/account/password")
    async def change_password(request: Request, session: Session) -> Response:
        form = await request.form()
        if not _csrf_ok(session.csrf, form.get(CSRF_FIELD)):
            return refused(request, session, 403, "This form did not come from this page; nothing was changed. "
                                                  "Reload the page and try again.")  # fmt: skip
        current, new, again = (str(form.get(k) or "") for k in ("current_password", "new_password", "repeat_password"))
        errors = _password_form_errors(current, new, again)
        status = 422
        if not errors:
            registry, address = _registry(request), client_address(request)
            try:
                change = s.PhysioUpdate(password=new, current_password=current)
                await _password_work(request, lambda: registry.update_physio(session.actor, session.email, change,
                                                                             address))  # fmt: skip
            except ValidationError as exc:
                errors = [_password_message(error) for error in exc.errors(include_url=False, include_input=False)]
            except RegistryError as exc:
                errors, status = [_password_sentence(exc)], exc.status
            else:
                return _redirect(HOME, request, "Your password is changed. Every other session of "
                                                            "yours is signed out.")  # fmt: skip
        return page(request, "password.html", {"errors": errors, "done": False}, status, session)

    # --- patients ---

    @router.get(f"{UI}/patients")
    def patients(request: Request, session: Session, scope: str = "mine") -> Response:
        registry, actor = _registry(request), session.actor
        everyone = scope == "all"
        try:
            clinic, zone = _clinic_zone(registry, actor)
            rows = registry.list_patients(actor, physio=None if everyone else session.email)
            today, now = datetime.now(zone).date(), utcnow()
            current: dict[str, list[s.PrescriptionOut]] = {}
            for rx in registry.list_prescriptions(actor):
                if _rx_state(rx, today) == "current":
                    current.setdefault(rx.patient, []).append(rx)
            kinds = {d.device_id: d.kind for d in registry.list_devices(actor)}
            worn: dict[str, list[str]] = {}
            for a in _current_assignments(registry.list_assignments(actor), now):
                worn.setdefault(a.patient, []).append(f"{a.device_id} ({kinds.get(a.device_id, '?')})")
        except RegistryError as exc:
            return refused(request, session, exc.status, str(exc))
        listed = [{"patient": p, "summaries": [rx_summary(rx) for rx in current.get(p.code, [])],
                   "garments": worn.get(p.code, [])} for p in rows]  # fmt: skip
        return page(request, "patients.html", {"rows": listed, "everyone": everyone, "clinic": clinic}, 200,
                    session)  # fmt: skip

    @router.get(f"{UI}/patients/{{code}}")
    def patient(request: Request, code: str, session: Session) -> Response:
        return _patient_page(request, session, code, {})

    def _patient_page(request: Request, session: WebSession, code: str, forms: dict[int, FormState],
                      status: int = 200) -> Response:  # fmt: skip
        registry, actor = _registry(request), session.actor
        try:
            clinic, zone = _clinic_zone(registry, actor)
            person = registry.get_patient(actor, code)
            prescriptions = registry.list_prescriptions(actor, code)
            assignments = registry.list_assignments(actor, patient=code)
            devices = {d.device_id: d for d in registry.list_devices(actor)}
            contraindications = registry.list_contraindications(actor, code)
            audit = registry.patient_audit(actor, code, 20)
        except RegistryError as exc:
            return refused(request, session, exc.status, str(exc))
        today, now = datetime.now(zone).date(), utcnow()
        current_ids = {a.id for a in _current_assignments(assignments, now)}
        garments = [{"assignment": a, "device": devices.get(a.device_id), "current": a.id in current_ids}
                    for a in reversed(assignments)]  # fmt: skip
        rx_rows = []
        for rx in reversed(prescriptions):
            state = forms.get(rx.id, FormState())
            values: dict[str, Any] = {key: _field_value(getattr(rx, key)) for key in EDITABLE[rx.garment_kind]}
            values["zones"] = list(rx.zones)
            values.update(state.values)
            rx_rows.append({"rx": rx, "state": _rx_state(rx, today), "summary": rx_summary(rx),
                            "fields": EDITABLE[rx.garment_kind], "zone_choices": ZONE_CHOICES[rx.garment_kind],
                            "values": values, "form": state})  # fmt: skip
        context = {"patient": person, "clinic": clinic, "tz": str(zone.key), "local": _local(zone),
                   "prescriptions": rx_rows, "garments": garments, "contraindications": contraindications,
                   "audit": audit, "today": today}  # fmt: skip
        return page(request, "patient.html", context, status, session)

    # --- editing a prescription ---

    @router.post(f"{UI}/prescriptions/{{rx_id}}")
    async def edit_prescription(request: Request, rx_id: int, session: Session) -> Response:
        form = await request.form()
        if not _csrf_ok(session.csrf, form.get(CSRF_FIELD)):
            message = "This form did not come from this page (missing or wrong CSRF token); nothing was changed."
            return refused(request, session, 403, message + " Reload the page and try again.")
        registry, actor = _registry(request), session.actor
        try:
            rx = registry.get_prescription(actor, rx_id)
        except RegistryError as exc:
            return refused(request, session, exc.status, str(exc))
        fields = EDITABLE[rx.garment_kind]
        sent: dict[str, Any] = {key: str(form.get(key) or "").strip() for key in fields}
        sent["zones"] = [z for z in form.getlist("zones") if isinstance(z, str)]
        reason = str(form.get("override_reason") or "").strip()
        effective = str(form.get("effective_from") or "").strip() or None
        confirm = str(form.get("confirm_reason") or "").strip()
        state = FormState(values={**sent, "override_reason": reason, "effective_from": effective or "",
                                  "confirm_reason": confirm}, needs_override=bool(reason),
                          needs_confirm=bool(confirm))  # fmt: skip
        back = f"{UI}/patients/{quote(rx.patient)}"

        missing = [LABELS[key] for key in fields if sent[key] == ""]
        if missing or not sent["zones"]:
            state.errors = [f"{label}: give a value" for label in missing]
            state.errors += [] if sent["zones"] else ["Zones: choose at least one zone"]
            return _patient_page(request, session, rx.patient, {rx_id: state}, 422)
        try:
            checked = s.PrescriptionUpdate.model_validate({**{k: sent[k] for k in fields}, "zones": sent["zones"]})
        except ValidationError as exc:
            state.errors = [_validation_message(error) for error in exc.errors(include_url=False)]
            return _patient_page(request, session, rx.patient, {rx_id: state}, 422)

        changed = {key: getattr(checked, key) for key in (*fields, "zones") if _differs(getattr(checked, key),
                                                                                         getattr(rx, key))}  # fmt: skip
        if not changed:
            return _redirect(back, request, f"Prescription #{rx_id}: nothing changed.")
        if reason:
            changed["override_reason"] = reason
        if confirm:
            changed["confirm_reason"] = confirm
        try:
            saved = registry.update_prescription(actor, rx_id, s.PrescriptionUpdate.model_validate(
                changed | ({"effective_from": effective} if effective else {})))  # fmt: skip
        except ValidationError as exc:  # the override reason's length
            state.errors = [_validation_message(error) for error in exc.errors(include_url=False)]
            return _patient_page(request, session, rx.patient, {rx_id: state}, 422)
        except RegistryError as exc:
            state.errors = [str(exc)]
            state.needs_override = state.needs_override or isinstance(exc, ContraindicatedError)
            state.needs_confirm = state.needs_confirm or isinstance(exc, ConfirmationNeededError)
            return _patient_page(request, session, rx.patient, {rx_id: state}, exc.status)
        what = ", ".join(f"{LABELS[k].split(' (')[0].lower()} {_plain(v)}" for k, v in changed.items()
                         if k not in ("override_reason", "confirm_reason"))  # fmt: skip
        if saved.supersedes is None:
            return _redirect(back, request, f"Prescription #{rx_id} saved: {what}.")
        return _redirect(back, request, f"Prescription #{saved.id} saved: {what}, from {saved.valid_from}. "
                                        f"#{rx_id} stays as it was for the days before.")  # fmt: skip

    return router


def _sentence(exc: RegistryError) -> str:
    text = str(exc)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _password_form_errors(current: str, new: str, again: str) -> list[str]:
    errors = [] if current else ["Current password: give the password you signed in with."]
    if not new:
        errors.append("New password: give a new password.")
    elif new != again:
        errors.append("Repeat the new password: it is not the same as the new password.")
    return errors


def _password_message(error: Mapping[str, Any]) -> str:
    loc = error.get("loc") or ()
    field = "Current password" if loc and loc[0] == "current_password" else "New password"
    return f"{field}: {str(error.get('msg', 'not valid')).removeprefix('Value error, ')}."


def _password_sentence(exc: RegistryError) -> str:
    """The service's refusal in the page's words (the field it is about first)."""
    text = str(exc)
    if text.startswith("password: "):
        return "New password: " + text.removeprefix("password: ") + ("" if text.endswith(".") else ".")
    if "current password is wrong" in text:
        return "Current password: it is not the one you sign in with."
    return _sentence(exc)


def _differs(new: object, old: object) -> bool:
    if isinstance(new, list) and isinstance(old, list):
        return set(new) != set(old)
    if isinstance(new, int | float) and isinstance(old, int | float):
        return abs(float(new) - float(old)) > 1e-9
    return new != old


def _validation_message(error: Mapping[str, Any]) -> str:
    loc = error.get("loc") or ()
    key = str(loc[0]) if loc else ""
    label = LABELS.get(key, key or "Form")
    return f"{label}: {error.get('msg', 'not valid')}"


# For pages mounted beside these (the physios' workspace): the same sign-in, session cookie, CSRF token and
# one-shot flash message.
current_session = _web_session
csrf_ok = _csrf_ok
redirect = _redirect
take_flash = _take_flash


def forget_flash(response: Response, request: Request) -> None:
    """Delete the flash cookie once its message is on a page."""
    _delete_cookie(response, request, FLASH_COOKIE, path=UI)


__all__ = ["CSRF_FIELD", "HOME", "UI", "WebSession", "csrf_ok", "csrf_token", "current_session", "forget_flash",
           "mount", "redirect", "rx_summary", "take_flash"]
