"""Start and stop a local Label Studio server (SQLite) for tests and the demo.

``start_local_label_studio(data_dir, ...)`` runs ``label-studio start`` from this environment on
127.0.0.1 with everything our loop needs (legacy API token for the admin, local-files serving
under a document root, loopback webhooks / ML backends allowed, no internet version check) and
waits until ``/health`` answers. A fresh data directory costs ~1 min of database migrations, so
the first start migrates a template once (cached under ``$MADSEG_CACHE`` or ``~/.cache/madseg``,
keyed by the Label Studio version and the admin credentials) and every later fresh data directory
is a copy of it: a start then takes seconds.

``signup_user`` / ``login_session`` create and log in extra users (raters, annotators) through the
web forms, as a person would; each gets its own API token.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_backend.errors import MadsegError

log = logging.getLogger(__name__)

DEFAULT_USERNAME = "admin@madseg.local"
DEFAULT_PASSWORD = "madseg-admin-pass"
DEFAULT_TOKEN = "madseg-local-admin-token"
_SQLITE = "label_studio.sqlite3"


def label_studio_version() -> str:
    """Version of the installed Label Studio server package (without starting it)."""
    try:
        from importlib.metadata import version

        return version("label-studio")
    except Exception as exc:  # PackageNotFoundError and friends
        raise MadsegError(
            "the Label Studio server is not installed in this environment "
            f"({type(exc).__name__}); install it with `pip install -e .[server]`"
        ) from None


def label_studio_executable() -> str:
    """Path of the ``label-studio`` command beside this Python, else the one on PATH."""
    beside = Path(sys.executable).with_name("label-studio")
    if beside.exists():
        return str(beside)
    found = shutil.which("label-studio")
    if not found:
        raise MadsegError("`label-studio` command not found; install it with `pip install -e .[server]`")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cache_dir() -> Path:
    """Where migrated template data directories are kept (``$MADSEG_CACHE`` or ``~/.cache/madseg``)."""
    env = os.environ.get("MADSEG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "madseg"


def label_studio_env(
    data_dir: Path,
    document_root: Path,
    username: str,
    password: str,
    token: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment for ``label-studio start``: SQLite in ``data_dir``, admin user, local files."""
    env = dict(os.environ)
    for key in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "DJANGO_DB", "POSTGRE_HOST"):
        env.pop(key, None)
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_USERNAME": username,
            "LABEL_STUDIO_PASSWORD": password,
            "LABEL_STUDIO_USER_TOKEN": token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "false",
            "COLLECT_ANALYTICS": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if extra:
        env.update(extra)
    return env


@dataclass
class LocalLabelStudio:
    """A running local Label Studio: where it is, the admin's credentials, the process."""

    url: str
    port: int
    data_dir: Path
    document_root: Path
    username: str
    password: str
    token: str
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def api_key(self) -> str:
        """The admin's legacy API token (``Authorization: Token ...``)."""
        return self.token

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the server log (health checks left out)."""
        return _read_tail(self.log_path, n)

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the server (its whole process group) and wait for it."""
        _stop_process(self.process, timeout)

    def __enter__(self) -> LocalLabelStudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _read_tail(log_path)
            raise MadsegError(
                f"Label Studio exited with status {proc.returncode} while starting; log {log_path}:\n{tail}"
            )
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    _stop_process(proc, 10)
    raise MadsegError(
        f"Label Studio did not answer {url}/health within {timeout:.0f} s; log {log_path}:\n"
        f"{_read_tail(log_path)}"
    )


def _read_tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join([ln for ln in lines if "GET /health" not in ln][-n:])


def _spawn(data_dir: Path, port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [label_studio_executable(), "start", "--internal-host", "127.0.0.1", "-p", str(port),
           "--no-browser"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        return subprocess.Popen(
            cmd, cwd=str(data_dir), env=env, stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def template_data_dir(
    username: str = DEFAULT_USERNAME,
    password: str = DEFAULT_PASSWORD,
    token: str = DEFAULT_TOKEN,
    *,
    timeout: float = 300.0,
) -> Path:
    """A migrated Label Studio data directory with the admin user, built once and cached.

    Safe against concurrent callers (a file lock); the cache key is the Label Studio version and
    the admin credentials.
    """
    key = hashlib.sha256(f"{username}\0{password}\0{token}".encode()).hexdigest()[:10]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"label-studio-{label_studio_version()}-{key}"
    if (target / _SQLITE).exists():
        return target
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _SQLITE).exists():
            return target
        log.info("migrating a Label Studio template data dir (first time only, ~1 min)")
        build = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        data, docroot = build / "data", build / "docroot"
        data.mkdir()
        docroot.mkdir()
        port = free_port()
        env = label_studio_env(data, docroot, username, password, token)
        proc = _spawn(data, port, env, build / "label-studio.log")
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc, build / "label-studio.log", timeout)
        finally:
            _stop_process(proc, 20)
        for junk in ("export", "test_data"):
            shutil.rmtree(data / junk, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(data, target)
        shutil.rmtree(build, ignore_errors=True)
        return target


def start_local_label_studio(
    data_dir: str | os.PathLike[str],
    *,
    port: int | None = None,
    document_root: str | os.PathLike[str] = "/",
    username: str = DEFAULT_USERNAME,
    password: str = DEFAULT_PASSWORD,
    token: str = DEFAULT_TOKEN,
    use_template: bool = True,
    extra_env: dict[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = 300.0,
) -> LocalLabelStudio:
    """Start Label Studio on 127.0.0.1 with its SQLite database in ``data_dir``; wait for /health.

    An empty ``data_dir`` is filled from the cached migrated template (``use_template``), an
    existing one is reused as is (the server resumes with its projects). Local files under
    ``document_root`` can be served; the admin ``username``/``password`` has the legacy API token
    ``token``. Stop it with ``.stop()`` (or use it as a context manager).
    """
    data_dir = Path(data_dir).resolve()
    document_root = Path(document_root).resolve()
    if not document_root.is_dir():
        raise MadsegError(f"Label Studio document root {document_root} is not a folder; create it first")
    data_dir.mkdir(parents=True, exist_ok=True)
    if use_template and not (data_dir / _SQLITE).exists():
        shutil.copytree(template_data_dir(username, password, token), data_dir, dirs_exist_ok=True)
    port = port or free_port()
    log_file = Path(log_path) if log_path else data_dir / "label-studio.log"
    env = label_studio_env(data_dir, document_root, username, password, token, extra_env)
    proc = _spawn(data_dir, port, env, log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_file, timeout)
    except BaseException:
        _stop_process(proc, 10)
        raise
    return LocalLabelStudio(url, port, data_dir, document_root, username, password, token, log_file, proc)


def _form_post(session: Any, url: str, page: str, data: dict[str, str]) -> Any:
    """GET a Django form page (for the CSRF cookie), then POST the form; the POST response."""
    session.get(url + page, timeout=30)
    csrf = session.cookies.get("csrftoken", "")
    return session.post(
        url + page, data={**data, "csrfmiddlewaretoken": csrf}, headers={"Referer": url + page},
        allow_redirects=False, timeout=30,
    )


def login_session(url: str, email: str, password: str) -> Any:
    """A ``requests.Session`` logged in to Label Studio at ``url`` through the login form."""
    import requests

    s = requests.Session()
    r = _form_post(s, url.rstrip("/"), "/user/login/", {"email": email, "password": password})
    if r.status_code not in (301, 302) or "sessionid" not in s.cookies:
        raise MadsegError(
            f"Label Studio at {url}: cannot log in as {email} (HTTP {r.status_code}); wrong password?"
        )
    return s


@dataclass(frozen=True)
class LSUser:
    """A Label Studio user made by :func:`signup_user`: credentials, id and legacy API token."""

    email: str
    password: str = field(repr=False)
    token: str = field(repr=False)
    user_id: int


def signup_user(url: str, email: str, password: str, invite_token: str | None = None) -> LSUser:
    """Sign up ``email`` through the signup form (or log in if it exists) and fetch its API token.

    The user joins the server's organisation. ``invite_token`` is needed when the server refuses
    signups without the invite link.
    """
    import requests

    url = url.rstrip("/")
    page = f"/user/signup/?token={invite_token}" if invite_token else "/user/signup/"
    s = requests.Session()
    try:
        r = _form_post(s, url, page, {"email": email, "password": password})
        if r.status_code not in (301, 302) or "sessionid" not in s.cookies:
            s = login_session(url, email, password)
        headers = {"X-CSRFToken": s.cookies.get("csrftoken", ""), "Referer": url + "/"}
        tok = s.get(url + "/api/current-user/token", headers=headers, timeout=30)
        me = s.get(url + "/api/current-user/whoami", headers=headers, timeout=30)
    except requests.RequestException as exc:
        raise MadsegError(
            f"Label Studio at {url}: signing up {email} failed ({type(exc).__name__})"
        ) from None
    if not tok.ok or not tok.json().get("token") or not me.ok:
        raise MadsegError(
            f"Label Studio at {url}: no API token for {email} (HTTP {tok.status_code}); legacy tokens "
            "must be enabled for the organisation"
        )
    token = str(tok.json()["token"])
    return LSUser(email=email, password=password, token=token, user_id=int(me.json()["id"]))
