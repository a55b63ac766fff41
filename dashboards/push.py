"""``compression dashboards push``: upload the dashboards to an existing Grafana through its HTTP API.

:func:`plan` says what is sent (pure data, unit-tested): the folder, each
dashboard (``overwrite: true``, into the folder), and the folder's
permissions: the Viewer and Editor roles may view, nothing more (admins keep
everything). The organisation's staff log in with Grafana accounts whose
organisation role is Viewer, so they see the dashboards and cannot change them;
a deployment is one organisation's (docs/dashboards.md, docs/security.md).
:func:`apply` carries the plan out over Grafana's HTTP API with httpx (not grafana-client: its HTTP stack,
niquests, pulls in urllib3-future, whose ``.pth`` file rewrites ``urllib3`` at every interpreter start and
breaks the requests-based tools beside it; README, "deviations").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import httpx

VIEW: Final = 1  # Grafana's folder permission levels: 1 View, 2 Edit, 4 Admin
FOLDER_UID: Final = "compression"
FOLDER_TITLE: Final = "Compression"


@dataclass(frozen=True)
class Step:
    """One HTTP API request of the push (path relative to ``/api``)."""

    action: Literal["ensure_folder", "dashboard", "folder_permissions"]
    method: str
    path: str
    body: dict[str, Any]


def plan(
    dashboards: dict[str, dict[str, Any]], folder_title: str = FOLDER_TITLE, folder_uid: str = FOLDER_UID
) -> list[Step]:
    """The requests of a push, in order: the folder (created when missing), each dashboard, the permissions."""
    steps = [Step("ensure_folder", "POST", "/folders", {"title": folder_title, "uid": folder_uid})]
    for name in sorted(dashboards):
        body = dict(dashboards[name])
        body.pop("id", None)  # matched by uid; an id from another Grafana would be refused
        steps.append(
            Step(
                "dashboard",
                "POST",
                "/dashboards/db",
                {
                    "dashboard": body,
                    "folderUid": folder_uid,
                    "overwrite": True,
                    "message": "compression dashboards push",
                },
            )
        )
    steps.append(
        Step(
            "folder_permissions",
            "POST",
            f"/folders/{folder_uid}/permissions",
            {"items": [{"role": "Viewer", "permission": VIEW}, {"role": "Editor", "permission": VIEW}]},
        )
    )
    return steps


class PushError(RuntimeError):
    """Grafana refused a request of the push, or could not be reached."""


def client(url: str, token: str | None = None, user: str | None = None, password: str | None = None,
           transport: httpx.BaseTransport | None = None) -> httpx.Client:  # fmt: skip
    """An HTTP client for Grafana's API at ``url`` with a service-account token or basic auth."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    auth = (user, password) if user and password and not token else None
    return httpx.Client(base_url=url.rstrip("/") + "/api", headers=headers, auth=auth, timeout=30.0,
                        transport=transport)  # fmt: skip


def _call(http: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    try:
        response = http.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise PushError(f"{method} /api{path}: {exc}") from exc
    if response.status_code >= 400 and not (method == "GET" and response.status_code == 404):
        raise PushError(f"{method} /api{path}: {response.status_code} {response.text[:300]}")
    return response


def apply(http: httpx.Client, steps: list[Step]) -> list[str]:
    """Carry out ``steps`` against Grafana's HTTP API; one line per step for the user."""
    done = []
    for step in steps:
        if step.action == "ensure_folder":
            uid, title = step.body["uid"], step.body["title"]
            if _call(http, "GET", f"/folders/{uid}").status_code == 404:
                _call(http, "POST", "/folders", step.body)
                done.append(f"folder {title!r} ({uid}) created")
            else:
                done.append(f"folder {title!r} ({uid}) exists")
        elif step.action == "dashboard":
            result = _call(http, step.method, step.path, step.body).json()
            done.append(f"dashboard {step.body['dashboard']['title']!r}: {result.get('status', 'ok')} "
                        f"{result.get('url', '')}".rstrip())  # fmt: skip
        else:
            _call(http, step.method, step.path, step.body)
            done.append("folder permissions: Viewer and Editor roles may view")
    return done


def ensure_datasource(http: httpx.Client, source: dict[str, Any]) -> str:
    """Create the data source ``source['uid']``, or update it when it exists (the demo uses this)."""
    uid = source["uid"]
    if _call(http, "GET", f"/datasources/uid/{uid}").status_code == 404:
        _call(http, "POST", "/datasources", source)
        return f"data source {uid} created"
    _call(http, "PUT", f"/datasources/uid/{uid}", source)
    return f"data source {uid} updated"
