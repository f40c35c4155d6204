"""Connect the madseg ML backend to a Label Studio project, basic auth included.

Label Studio calls ``/health`` and ``/setup`` when a backend is added and auto-creates a webhook to
``<backend>/webhook`` for all actions. It sends the backend's basic-auth credentials on its own
ML calls, but the auto-created webhook carries no credentials, so a backend that requires basic
auth would refuse every webhook (401). :func:`connect_backend` therefore also puts an
``Authorization`` header on that webhook. Idempotent: re-running reuses the existing connection.

:func:`connect_ml_backend` does the same through a :class:`.client.LabelStudioClient` (retries).
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING, Any

from ..errors import MadsegError

if TYPE_CHECKING:
    from .client import LabelStudioClient

log = logging.getLogger(__name__)


def basic_auth_header(user: str, password: str) -> str:
    """``Basic <base64(user:password)>``."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def connect_backend(
    ls: Any,
    project_id: int,
    url: str,
    *,
    basic_auth: tuple[str, str] | None = None,
    title: str = "madseg target model",
    timeout_s: float = 120.0,
) -> int:
    """Connect the backend at ``url`` to project ``project_id``; returns the ML backend id.

    ``ls`` is a ``label_studio_sdk.LabelStudio`` client (e.g. ``LabelStudioClient.sdk``, :mod:`.client`).
    With ``basic_auth`` = (user, password) Label Studio uses the credentials for its calls to the backend
    and the auto-created ``/webhook`` gets the matching ``Authorization`` header.
    Raises :class:`MadsegError` when Label Studio cannot reach or set up the backend.
    """
    from label_studio_sdk.core.api_error import ApiError

    url = url.rstrip("/")
    auth_kwargs: dict[str, Any] = {"auth_method": "NONE"}
    if basic_auth is not None:
        auth_kwargs = {"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0],
                       "basic_auth_pass": basic_auth[1]}
    try:
        existing = [m for m in ls.ml.list(project=project_id) if (m.url or "").rstrip("/") == url]
        if existing:
            ml_id = int(existing[0].id)
            ls.ml.update(ml_id, project=project_id, url=url, **auth_kwargs)
        else:
            ml = ls.ml.create(project=project_id, url=url, title=title, is_interactive=False,
                              timeout=timeout_s, **auth_kwargs)
            ml_id = int(ml.id)
        hook_url = url + "/webhook"

        def our_hooks() -> list[Any]:
            hooks = ls.webhooks.list(project=str(project_id))
            return [h for h in hooks if (h.url or "").rstrip("/") == hook_url]

        hooks = our_hooks()
        if not hooks:
            ls.webhooks.create(project=project_id, url=hook_url, send_payload=True, send_for_all_actions=True)
            hooks = our_hooks()
        if basic_auth is not None:
            for hook in hooks:
                ls.webhooks.update(hook.id, headers={"Authorization": basic_auth_header(*basic_auth)})
    except ApiError as exc:
        detail = exc.body if isinstance(exc.body, (str, dict)) else ""
        raise MadsegError(
            f"Label Studio could not connect the ML backend {url} to project {project_id} "
            f"(HTTP {exc.status_code}: {str(detail)[:300]}); is the backend running and reachable from "
            "Label Studio, with the same basic-auth credentials?"
        ) from None
    log.info("ML backend %s connected to project %d (ml backend id %d)", url, project_id, ml_id)
    return ml_id


def connect_ml_backend(
    client: LabelStudioClient, project_id: int, url: str, basic_auth: tuple[str, str] | None = None
) -> int:
    """Connect the ML backend at ``url`` to the project (idempotent, with retries); the ML backend id."""
    return client.call(f"connecting ML backend {url} to project {project_id}",
                       lambda: connect_backend(client.sdk, project_id, url, basic_auth=basic_auth))
