"""``compression dashboards push``: upload the dashboards to an existing Grafana through its HTTP API.

:func:`plan` says what is sent (pure data, unit-tested): the folder, each
dashboard (``overwrite: true``, into the folder), and the folder's
permissions: the Viewer and Editor roles may view, nothing more (admins keep
everything). Physios log in with Grafana accounts whose organisation role is
Viewer, so they see the dashboards and cannot change them
(docs/dashboards.md). :func:`apply` carries the plan out with grafana-client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

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


def apply(api: Any, steps: list[Step]) -> list[str]:
    """Carry out ``steps`` with a ``grafana_client.GrafanaApi``; one line per step for the user."""
    from grafana_client.client import GrafanaClientError

    done = []
    for step in steps:
        if step.action == "ensure_folder":
            uid, title = step.body["uid"], step.body["title"]
            try:
                api.folder.get_folder(uid)
                done.append(f"folder {title!r} ({uid}) exists")
            except GrafanaClientError as exc:
                if getattr(exc, "status_code", None) != 404:
                    raise
                api.folder.create_folder(title, uid=uid)
                done.append(f"folder {title!r} ({uid}) created")
        elif step.action == "dashboard":
            result = api.dashboard.update_dashboard(step.body)
            done.append(
                f"dashboard {step.body['dashboard']['title']!r}: {result.get('status', 'ok')} "
                f"{result.get('url', '')}".rstrip()
            )
        else:
            api.folder.update_folder_permissions(step.path.split("/")[2], step.body["items"])
            done.append("folder permissions: Viewer and Editor roles may view")
    return done
