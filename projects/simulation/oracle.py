"""Simulated raters and annotators ("the oracle") — for the demo, tests and benchmarks only.

Never the default for real use: an experiment uses it only with ``[oracle] enabled = true``.
The oracle is the ONLY code in madseg that reads ground truth; the sampler and the fine-tuning
see labels only through Label Studio, exactly as with people.

Rating model (pure, documented mapping)
    For an image with a ground-truth mask, the *true quality* is the per-image mIoU of the
    target's prediction against it (``ml_backend.metrics``: 255 pixels ignored, mean over the
    classes present in either map). Rater r perceives ``q_r = mIoU + e_r`` with
    ``e_r ~ N(0, noise^2)`` drawn from ``numpy.random.default_rng([seed, r, crc32(image_id)])``
    (so a score never depends on the order of work, and re-runs give the same scores), and
    answers ``1 + #{t in thresholds : q_r >= t}``; with the default thresholds 0.2/0.4/0.6/0.8::

        mIoU  < 0.2 -> 1 bad,  < 0.4 -> 2 poor,  < 0.6 -> 3 fair,  < 0.8 -> 4 good,  else 5 excellent

    Out of domain: the image has no ground-truth mask at all (e.g. ``unlabelled/``), or its mask
    has no pixel of a foreground class (1..C-1). Every rater flags such an image; as the rating
    is required by the form, they then answer 3 (fair) when there is no mask to compare with
    (the OOD veto makes the score irrelevant).

Annotation model
    The annotator submits the ground-truth mask as one brush region per class present. Class 0
    is painted too when the project has a background label. Ignore pixels (255) follow
    ``[oracle] ignore``: ``"unlabeled"`` (default) leaves them unpainted — like a person who
    does not paint what the class list does not cover, so the exporter decides what unpainted
    pixels mean; ``"background"`` paints them as background (when the project has that label).

Label Studio side (I/O)
    Each simulated person is a separate Label Studio user (``madseg-rater-1`` ...,
    ``madseg-annotator-1``, e-mail ``<name>@madseg.example.com``) that signs up through the
    organisation's invite link, logs in with the web form and uses its OWN API token with
    ``label_studio_sdk``. Passwords are derived (HMAC) from the organisation invite token, so
    re-runs log in again; personal access tokens are kept in a 0600 file between runs
    (:func:`default_token_store`); nothing secret is printed. Work is resumable: a user skips every
    task it has already annotated. The control names (``from_name``/``to_name``/labels) come from
    the project's own label config, checked by ``ml_backend.labelstudio.configs.validate_*_config``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.classes import IGNORE_INDEX, VOC_CLASSES
from ml_backend.errors import MadsegError
from ml_backend.labelmaps import resize_labels
from ml_backend.labelstudio.configs import (
    BrushControls,
    RatingControls,
    validate_rating_config,
    validate_segmentation_config,
)
from ml_backend.metrics import confusion_matrix, miou_from_confusion

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS: tuple[float, float, float, float] = (0.2, 0.4, 0.6, 0.8)
#: Score given (with the OOD flag) to an image that has no ground-truth mask.
NO_GT_SCORE = 3
ORACLE_EMAIL_DOMAIN = "madseg.example.com"

# =============================================================================================
# pure part: quality, scores, OOD, results
# =============================================================================================


def per_image_miou(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    """mIoU of one (H, W) prediction against its (H, W) ground truth (255 ignored); the prediction
    is resized (nearest) to the ground truth's size first if needed. 0.0 if no valid pixel."""
    pred = resize_labels(pred, gt.shape)
    return miou_from_confusion(confusion_matrix(pred, gt, num_classes, IGNORE_INDEX))


def is_out_of_domain(gt: np.ndarray | None, num_classes: int) -> bool:
    """True when there is no ground truth (``None``) or it has no pixel of a class 1..C-1."""
    if gt is None:
        return True
    return not bool(((gt >= 1) & (gt < num_classes)).any())


def score_from_quality(quality: float, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> int:
    """Score 1..5: ``1 + number of thresholds <= quality`` (thresholds: 4 increasing values)."""
    return 1 + int(sum(quality >= t for t in thresholds))


def _image_key(image_id: str) -> int:
    return zlib.crc32(str(image_id).encode("utf-8"))


def simulated_scores(
    image_id: str,
    miou: float | None,
    *,
    n_raters: int = 3,
    noise: float = 0.1,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    seed: int = 0,
) -> list[int]:
    """The 1..5 scores of raters 0..n_raters-1 for one image (see the module docstring).

    ``miou`` = ``None`` (no ground truth) gives :data:`NO_GT_SCORE` for everyone.
    """
    if miou is None:
        return [NO_GT_SCORE] * n_raters
    out = []
    for r in range(n_raters):
        e = np.random.default_rng([seed, r, _image_key(image_id)]).normal(0.0, noise) if noise > 0 else 0.0
        out.append(score_from_quality(miou + float(e), thresholds))
    return out


def rating_result(score: int, ood: bool, controls: RatingControls) -> list[dict[str, Any]]:
    """The annotation ``result`` of one rating: the score's choice (``RATING_CHOICES`` of
    ``ml_backend.labelstudio.configs``), plus the out-of-domain flag if set. ``controls`` from
    ``ml_backend.labelstudio.configs.validate_rating_config``."""
    from ml_backend.labelstudio.configs import OOD_CHOICE, RATING_CHOICES

    if not 1 <= score <= 5:
        raise ValueError(f"score must be 1..5, got {score}")
    res: list[dict[str, Any]] = [{
        "from_name": controls.rating_from, "to_name": controls.rating_to, "type": "choices",
        "value": {"choices": [RATING_CHOICES[score - 1]]},
    }]
    if ood:
        res.append({
            "from_name": controls.ood_from, "to_name": controls.ood_to, "type": "choices",
            "value": {"choices": [OOD_CHOICE]},
        })
    return res


def annotation_regions(
    gt: np.ndarray, class_names: Sequence[str], labels: Iterable[str], ignore: str = "unlabeled"
) -> list[tuple[str, np.ndarray]]:
    """The (label, (H, W) bool mask) regions the annotator paints for a ground-truth mask (H, W).

    One region per class present (in class order) whose name is among ``labels``; background
    (class 0) only if it is a label. ``ignore="background"`` adds 255 pixels to background.
    A class present in the mask but missing from ``labels`` raises :class:`MadsegError`.
    """
    if ignore not in ("unlabeled", "background"):
        raise ValueError(f"ignore must be 'unlabeled' or 'background', got {ignore!r}")
    labels = set(labels)
    present = np.flatnonzero(np.bincount(gt.reshape(-1), minlength=256)[: len(class_names)])
    out = []
    for k in present.tolist():
        name = class_names[k]
        if k == 0:
            if name not in labels:
                continue
            region = (gt == 0) | (gt == IGNORE_INDEX) if ignore == "background" else gt == 0
        else:
            if name not in labels:
                raise MadsegError(f"segmentation project has no brush label {name!r} for class {k}; "
                                  "its label config does not match the experiment's classes")
            region = gt == k
        out.append((name, region))
    bg_label = class_names[0] in labels
    if ignore == "background" and 0 not in present and bg_label and (gt == IGNORE_INDEX).any():
        out.insert(0, (class_names[0], gt == IGNORE_INDEX))
    return out


def brush_result(
    gt: np.ndarray, class_names: Sequence[str], controls: BrushControls, ignore: str = "unlabeled"
) -> list[dict[str, Any]]:
    """The brush-label ``result`` list that paints ground truth (H, W) (one RLE region per class);
    ``controls`` from ``ml_backend.labelstudio.configs.validate_segmentation_config``."""
    from ml_backend.labelstudio.brush import brush_region

    return [
        brush_region(controls, name, region)
        for name, region in annotation_regions(gt, class_names, controls.labels, ignore)
    ]


# =============================================================================================
# ground truth lookup (the oracle's private data)
# =============================================================================================


class GroundTruth:
    """Ground-truth masks found by image file stem in one or more folders (``<folder>/<stem>.png``).

    The index is built on first use. A stem present in two folders is an error (ambiguous).
    """

    def __init__(
        self, folders: Sequence[str | os.PathLike[str]], num_classes: int = len(VOC_CLASSES)
    ) -> None:
        self.folders = [Path(f) for f in folders]
        self.num_classes = num_classes
        self._index: dict[str, Path] | None = None

    def _build(self) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for folder in self.folders:
            if not folder.is_dir():
                raise MadsegError(f"{folder}: ground-truth folder does not exist; fix [oracle] gt")
            for p in sorted(folder.glob("*.png")):
                if p.stem in index:
                    raise MadsegError(f"ground truth for {p.stem!r} is in both {index[p.stem]} and {p}; "
                                      "[oracle] gt folders must not share file names")
                index[p.stem] = p
        return index

    def path_for(self, image: str | os.PathLike[str]) -> Path | None:
        """The mask file of an image (path or stem), or ``None`` if it has no ground truth."""
        if self._index is None:
            self._index = self._build()
        return self._index.get(Path(image).stem)

    def load(self, image: str | os.PathLike[str]) -> np.ndarray | None:
        """The (H, W) uint8 ground truth of an image, or ``None`` if it has none."""
        from ml_backend.imageio import read_mask

        p = self.path_for(image)
        return None if p is None else read_mask(p, self.num_classes)


@dataclass
class OracleImage:
    """What the oracle needs about one task's image.

    ``path``: the image file (its stem finds the ground truth); ``prediction``: the target's
    (h, w) label map shown to the raters, or a zero-argument callable that returns it (loaded
    lazily, any size — resized to the ground truth); not needed for annotation.
    """

    image_id: str
    path: str | os.PathLike[str]
    prediction: np.ndarray | Callable[[], np.ndarray] | None = None

    def label_map(self) -> np.ndarray:
        if self.prediction is None:
            raise MadsegError(f"oracle: no target prediction for image {self.image_id}")
        return self.prediction() if callable(self.prediction) else self.prediction


@dataclass(frozen=True)
class OracleRating:
    """The oracle's verdict for one image: the true mIoU (None without ground truth), OOD, scores."""

    image_id: str
    miou: float | None
    ood: bool
    scores: tuple[int, ...]


def rate_image(
    image: OracleImage,
    gt: np.ndarray | None,
    *,
    n_raters: int,
    num_classes: int,
    noise: float,
    thresholds: Sequence[float],
    seed: int,
) -> OracleRating:
    """Rate one image: true per-image mIoU of the target's prediction, OOD flag, n_raters scores."""
    miou = None if gt is None else per_image_miou(image.label_map(), gt, num_classes)
    ood = is_out_of_domain(gt, num_classes)
    scores = simulated_scores(image.image_id, miou, n_raters=n_raters, noise=noise,
                              thresholds=thresholds, seed=seed)
    return OracleRating(image.image_id, miou, ood, tuple(scores))


# =============================================================================================
# I/O part: separate Label Studio users through the API
# =============================================================================================

def default_image_id_of(task: Mapping[str, Any]) -> str | None:
    """The madseg image id of a Label Studio task (``labelstudio.export.task_image_id``: ``meta`` or
    ``data`` key ``image_id``); ``None`` if the task carries none."""
    from ml_backend.labelstudio.export import task_image_id

    return task_image_id(task)


@dataclass
class OracleUser:
    """A simulated person: its Label Studio user id and an SDK client acting as that user."""

    name: str
    email: str
    user_id: int
    client: Any = dataclasses.field(repr=False)


def _password_for(secret: str, email: str) -> str:
    """The simulated user's password: HMAC of its e-mail keyed by the organisation's invite token
    (stable across admin API keys, readable only by organisation admins)."""
    return hmac.new(secret.encode(), f"madseg-oracle:{email}".encode(), hashlib.sha256).hexdigest()[:32]


def _http_error(url: str, what: str, exc: Exception) -> MadsegError:
    return MadsegError(f"Label Studio at {url}: {what} failed ({type(exc).__name__}); is the server up?")


def _form_post(session: Any, url: str, page: str, data: dict[str, str]) -> Any:
    """GET a Django form page (for the CSRF cookie) and POST it; returns the POST response."""
    session.get(url + page, timeout=30)
    csrf = session.cookies.get("csrftoken", "")
    return session.post(url + page, data={**data, "csrfmiddlewaretoken": csrf},
                        headers={"Referer": url + page}, allow_redirects=False, timeout=30)


def _session_user(session: Any, url: str) -> int | None:
    """The id of the user a web session is logged in as, or None."""
    r = session.get(url + "/api/current-user/whoami", timeout=30)
    if r.status_code != 200:
        return None
    try:
        return int(r.json()["id"])
    except (ValueError, KeyError, TypeError):
        return None


def default_token_store() -> Path:
    """Where simulated users' personal access tokens are kept between runs:
    ``$MADSEG_ORACLE_TOKENS`` or ``<XDG cache>/madseg/oracle-tokens.json`` (mode 0600)."""
    env = os.environ.get("MADSEG_ORACLE_TOKENS")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "madseg" / "oracle-tokens.json"


def _read_tokens(store: Path) -> dict[str, str]:
    try:
        data = json.loads(store.read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_token(store: Path, key: str, token: str) -> None:
    from ml_backend.atomic import atomic_write

    data = _read_tokens(store)
    data[key] = token
    payload = json.dumps(data, indent=1).encode()

    def write(fh: Any) -> None:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(payload)

    atomic_write(store, write)


def ensure_user(
    url: str,
    admin_client: Any,
    name: str,
    *,
    token_store: str | os.PathLike[str] | None = None,
) -> OracleUser:
    """Sign up (via the organisation's invite link) or log in the simulated user ``name`` with the
    web form, and return an SDK client that acts as that user with its OWN API token.

    Token, in this order: the personal access token kept in ``token_store`` (default
    :func:`default_token_store`) for this server and user; the user's legacy token (when the
    organisation accepts legacy tokens); a new personal access token, saved to ``token_store``.
    Tokens are never printed or logged.
    """
    import requests
    from label_studio_sdk import LabelStudio

    email = f"{name}@{ORACLE_EMAIL_DOMAIN}"
    try:
        invite = admin_client.organizations.invites.get_invite_link().token
    except Exception as exc:  # the SDK raises many kinds
        raise MadsegError(f"Label Studio at {url}: cannot read the organisation's invite token "
                          f"({type(exc).__name__}); check the URL and that the API key belongs to an "
                          "organisation admin") from None
    if not invite:
        raise MadsegError(f"Label Studio at {url}: the organisation has no invite token; reset it in "
                          "Organization settings")
    password = _password_for(str(invite), email)
    store = Path(token_store) if token_store is not None else default_token_store()
    store_key = f"{url}|{email}"

    def as_user(tok: str, uid: int) -> OracleUser | None:
        client = LabelStudio(base_url=url, api_key=tok)
        try:
            me = client.users.whoami()
        except Exception:  # a refused or expired token: try the next kind
            return None
        if int(me.id) != uid:
            return None
        return OracleUser(name=name, email=email, user_id=uid, client=client)

    try:
        s = requests.Session()
        r = _form_post(s, url, "/user/login/", {"email": email, "password": password})
        uid = _session_user(s, url) if r.status_code in (301, 302) else None
        if uid is None:
            s = requests.Session()
            r = _form_post(s, url, f"/user/signup/?token={invite}", {"email": email, "password": password})
            uid = _session_user(s, url) if r.status_code in (301, 302) else None
            if uid is None:
                raise MadsegError(
                    f"Label Studio at {url}: simulated user {email} can neither log in nor sign up "
                    f"(HTTP {r.status_code}); it may exist with another password (the invite link was "
                    "reset): delete it in the Organization page and re-run"
                )
        stored = _read_tokens(store).get(store_key)
        if stored and (user := as_user(stored, uid)):
            return user
        headers = {"X-CSRFToken": s.cookies.get("csrftoken", ""), "Referer": url + "/"}
        r = s.get(url + "/api/current-user/token", headers=headers, timeout=30)
        legacy = r.json().get("token") if r.ok else None
        if legacy and (user := as_user(str(legacy), uid)):
            return user
        r = s.post(url + "/api/token/", headers=headers, json={}, timeout=30)
        if r.status_code == 201 and r.json().get("token"):
            pat = str(r.json()["token"])
            _write_token(store, store_key, pat)
            if user := as_user(pat, uid):
                return user
    except requests.RequestException as exc:
        raise _http_error(url, f"logging in simulated user {email}", exc) from None
    raise MadsegError(
        f"Label Studio at {url}: no usable API token for simulated user {email}: legacy tokens are "
        f"disabled and its personal access token is not in {store}; revoke that token (log in as the user, "
        "Account & Settings) or enable legacy tokens (Organization > API Tokens), then re-run"
    )


def _completed_by(annotation: Mapping[str, Any]) -> int | None:
    cb = annotation.get("completed_by")
    if isinstance(cb, Mapping):
        cb = cb.get("id")
    return int(cb) if cb is not None else None


def _project_tasks(client: Any, project_id: int) -> list[dict[str, Any]]:
    """All tasks of a project with their annotations, as plain dicts (paged)."""
    out = []
    for t in client.tasks.list(project=project_id, fields="all", page_size=100):
        d = t.model_dump() if hasattr(t, "model_dump") else dict(t)
        out.append(d)
    return out


@dataclass
class OracleRun:
    """What a call of :func:`play_raters` / :func:`play_annotator` did.

    ``submitted``: annotations created; ``already_done``: (user, task) pairs skipped because the
    user had annotated the task before (resume); ``unknown_tasks``: task ids whose image the
    oracle was not given; ``left_to_people``: task ids the oracle cannot do (an image without
    ground truth in a segmentation project); ``ratings``: image id -> :class:`OracleRating` (raters only).
    """

    submitted: int = 0
    already_done: int = 0
    unknown_tasks: list[int] = field(default_factory=list)
    left_to_people: list[int] = field(default_factory=list)
    ratings: dict[str, OracleRating] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted, "already_done": self.already_done,
            "unknown_tasks": list(self.unknown_tasks), "left_to_people": list(self.left_to_people),
            "ratings": {k: dataclasses.asdict(v) for k, v in self.ratings.items()},
        }


def _admin(url: str, api_key: str) -> Any:
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url, api_key=api_key)


def _label_config(admin: Any, url: str, project_id: int) -> str:
    try:
        return admin.projects.get(id=project_id).label_config
    except Exception as exc:  # the SDK raises many kinds
        raise _http_error(url, f"reading project {project_id}", exc) from None


def _play(
    url: str,
    api_key: str,
    project_id: int,
    users: Sequence[str],
    images: Mapping[str, OracleImage],
    make_result: Callable[[int, OracleImage], list[dict[str, Any]] | None],
    image_id_of: Callable[[Mapping[str, Any]], str | None],
    progress: bool,
    desc: str,
    token_store: str | os.PathLike[str] | None = None,
    workers: int = 1,
) -> OracleRun:
    from tqdm import tqdm

    admin = _admin(url, api_key)
    run = OracleRun()
    actors = [ensure_user(url, admin, name, token_store=token_store) for name in users]
    tasks = _project_tasks(admin, project_id)
    todo: list[tuple[int, dict[str, Any], OracleImage]] = []
    for t in tasks:
        iid = image_id_of(t)
        if iid is None or iid not in images:
            run.unknown_tasks.append(int(t["id"]))
            continue
        done_by = {_completed_by(a) for a in (t.get("annotations") or []) if not a.get("was_cancelled")}
        for r, user in enumerate(actors):
            if user.user_id in done_by:
                run.already_done += 1
            else:
                todo.append((r, t, images[iid]))
    if run.unknown_tasks:
        log.warning("oracle: %d task(s) of project %d have no known image (ids %s...); left alone",
                    len(run.unknown_tasks), project_id, run.unknown_tasks[:5])
    jobs: list[tuple[int, int, list[dict[str, Any]]]] = []
    for r, t, img in todo:
        result = make_result(r, img)
        if result is None:
            run.left_to_people.append(int(t["id"]))
        else:
            jobs.append((r, int(t["id"]), result))
    run.left_to_people = sorted(set(run.left_to_people))

    def submit(job: tuple[int, int, list[dict[str, Any]]]) -> None:
        r, task_id, result = job
        try:
            actors[r].client.annotations.create(id=task_id, result=result, project=project_id)
        except Exception as exc:  # the SDK raises many kinds
            what = f"submitting {actors[r].name}'s annotation of task {task_id}"
            raise _http_error(url, what, exc) from None

    # the server needs ~0.3 s per annotation (SQLite, 2 cores); more workers did not help there but
    # may with a PostgreSQL-backed server
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(jobs), desc=desc, unit="annotation", disable=not progress) as bar:
        for _ in pool.map(submit, jobs):
            run.submitted += 1
            bar.update(1)
    return run


def play_raters(
    url: str,
    api_key: str,
    project_id: int,
    images: Mapping[str, OracleImage],
    gt: GroundTruth,
    *,
    n_raters: int = 3,
    noise: float = 0.1,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    seed: int = 0,
    class_names: Sequence[str] = VOC_CLASSES,
    image_id_of: Callable[[Mapping[str, Any]], str | None] = default_image_id_of,
    progress: bool = True,
    token_store: str | os.PathLike[str] | None = None,
    workers: int = 1,
) -> OracleRun:
    """Rate every task of a rating project as ``n_raters`` separate users (``madseg-rater-1``...).

    ``images``: image id -> :class:`OracleImage` (with the target's prediction); tasks are matched
    by ``image_id_of(task)``. Tasks a rater has already annotated are skipped (resumable).
    ``token_store``: see :func:`ensure_user`; ``workers``: annotations submitted concurrently.
    """
    admin = _admin(url, api_key)
    controls = validate_rating_config(_label_config(admin, url, project_id), f"rating project {project_id}")
    cache: dict[str, OracleRating] = {}
    run_ratings: dict[str, OracleRating] = {}

    def result(r: int, img: OracleImage) -> list[dict[str, Any]]:
        if img.image_id not in cache:
            cache[img.image_id] = rate_image(img, gt.load(img.path), n_raters=n_raters,
                                             num_classes=len(class_names), noise=noise,
                                             thresholds=thresholds, seed=seed)
            run_ratings[img.image_id] = cache[img.image_id]
        rating = cache[img.image_id]
        return rating_result(rating.scores[r], rating.ood, controls)

    users = [f"madseg-rater-{r + 1}" for r in range(n_raters)]
    run = _play(url, api_key, project_id, users, images, result, image_id_of, progress, "oracle ratings",
                token_store, workers)
    run.ratings = run_ratings
    return run


def play_annotator(
    url: str,
    api_key: str,
    project_id: int,
    images: Mapping[str, OracleImage],
    gt: GroundTruth,
    *,
    class_names: Sequence[str] = VOC_CLASSES,
    ignore: str = "unlabeled",
    image_id_of: Callable[[Mapping[str, Any]], str | None] = default_image_id_of,
    progress: bool = True,
    token_store: str | os.PathLike[str] | None = None,
    workers: int = 1,
) -> OracleRun:
    """Paint every task of a segmentation project with its ground truth as ``madseg-annotator-1``.

    A task whose image has no ground truth is left to people (``OracleRun.left_to_people``).
    Resumable like :func:`play_raters`.
    """
    admin = _admin(url, api_key)
    controls = validate_segmentation_config(_label_config(admin, url, project_id), class_names,
                                            f"segmentation project {project_id}")

    def result(_r: int, img: OracleImage) -> list[dict[str, Any]] | None:
        mask = gt.load(img.path)
        if mask is None:
            log.warning("oracle: no ground truth for image %s; its segmentation task is left to people",
                        img.image_id)
            return None
        return brush_result(mask, class_names, controls, ignore)

    return _play(url, api_key, project_id, ["madseg-annotator-1"], images, result, image_id_of,
                 progress, "oracle masks", token_store, workers)

