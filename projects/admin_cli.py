"""``madseg ls ...``: Label Studio administration of a round from the command line.

Connection from ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``; the local-files document root from
``--document-root`` or ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` (the same variable Label Studio
reads). Every command prints a JSON summary on stdout and can be re-run safely.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ml_backend.errors import MadsegError


def _classes(value: str | None) -> list[str]:
    from ml_backend.classes import VOC_CLASSES

    if not value:
        return list(VOC_CLASSES)
    p = Path(value)
    if p.is_file():
        names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise MadsegError(f"--classes {value!r}: no class names (give a comma list or a file, one per line)")
    return names


def _print(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _client(args: argparse.Namespace) -> Any:
    from ml_backend.labelstudio.client import connect

    return connect(args.url, None)


def _ids(values: list[str] | None, file: str | None) -> list[str] | None:
    ids: list[str] = list(values or [])
    if file:
        p = Path(file)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise MadsegError(f"{p}: cannot read ids ({exc.strerror or exc})") from None
        try:
            obj = json.loads(text)
            ids += [str(x) for x in (obj.get("S", []) if isinstance(obj, dict) else obj)]
        except json.JSONDecodeError:
            ids += [ln.strip() for ln in text.splitlines() if ln.strip()]
    return ids or None


def cmd_create_round(args: argparse.Namespace) -> int:
    from .round_projects import create_round_projects

    client = _client(args)
    ids = create_round_projects(
        client, args.experiment, args.round, classes=_classes(args.classes), raters_per_task=args.raters,
        sampling=args.sampling, document_root=args.document_root, storage_folders=args.storage or (),
    )
    _print(ids.to_dict())
    return 0


def cmd_register_storage(args: argparse.Namespace) -> int:
    from ml_backend.labelstudio.local_files import resolve_document_root

    from .round_projects import register_local_storage

    client = _client(args)
    root = resolve_document_root(args.document_root)
    _print({"storage": register_local_storage(client, args.project, args.folder, root)})
    return 0


def cmd_connect_backend(args: argparse.Namespace) -> int:
    from ml_backend.labelstudio.connect import connect_ml_backend

    auth = None
    if args.basic_auth_user:
        password = os.environ.get(args.basic_auth_password_env or "", "")
        if not password:
            raise MadsegError(f"--basic-auth-user given but ${args.basic_auth_password_env} is empty; "
                              "put the backend's password in that environment variable")
        auth = (args.basic_auth_user, password)
    client = _client(args)
    _print({"ml_backend": connect_ml_backend(client, args.project, args.backend_url, auth)})
    return 0


def _candidates(args: argparse.Namespace) -> list[dict[str, Any]]:
    from sampler.candidates import read_candidates

    cands = [c.to_dict() for c in read_candidates(args.candidates)]
    wanted = _ids(args.ids, args.ids_file)
    if wanted is not None:
        by_id = {c["id"]: c for c in cands}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise MadsegError(f"ids {missing[:5]} are not in {args.candidates}")
        cands = [by_id[i] for i in wanted]
    return cands


def cmd_push_rating(args: argparse.Namespace) -> int:
    from .rating import push_rating_tasks

    client = _client(args)
    res = push_rating_tasks(
        client, args.project, _candidates(args), predictions=args.pred_dir, overlay_dir=args.overlay_dir,
        document_root=args.document_root, num_classes=len(_classes(args.classes)), alpha=args.alpha,
        batch_size=args.batch_size,
    )
    _print(res.to_dict())
    return 0


def cmd_collect_ratings(args: argparse.Namespace) -> int:
    from ml_backend.atomic import atomic_write_json

    from .mos import choose_lowest, mean_opinion_scores
    from .rating import collect_ratings, rating_progress

    client = _client(args)
    done, total = rating_progress(client, args.project, args.raters)
    ratings = collect_ratings(client, args.project)
    mos = mean_opinion_scores(ratings)
    chosen = choose_lowest(mos, args.n4, _ids(None, args.exclude) or ()) if args.n4 is not None else None
    out = {
        "project": args.project, "complete": done, "tasks": total,
        "ratings": [r.__dict__ for r in ratings],
        "mos": {k: (None if v == float("inf") else v) for k, v in sorted(mos.items())},
        "ood": sorted(k for k, v in mos.items() if v == float("inf")),
        "S": chosen,
    }
    if args.out:
        atomic_write_json(args.out, out)
    _print({k: out[k] for k in ("project", "complete", "tasks", "ood", "S")})
    if done < total:
        print(f"note: only {done} of {total} tasks have {args.raters} ratings yet", file=sys.stderr)
    return 0


def cmd_push_segmentation(args: argparse.Namespace) -> int:
    from .segmentation import push_segmentation_tasks

    client = _client(args)
    res = push_segmentation_tasks(
        client, args.project, _candidates(args), predictions=args.pred_dir, model_version=args.model_version,
        classes=_classes(args.classes), document_root=args.document_root, batch_size=args.batch_size,
    )
    _print(res.to_dict())
    return 0


def cmd_export_masks(args: argparse.Namespace) -> int:
    from ml_backend.labelstudio.export import export_masks

    client = _client(args)
    written = export_masks(client, args.project, args.out, classes=_classes(args.classes),
                           document_root=args.document_root)
    _print({"exported": len(written), "out": str(args.out)})
    return 0


def cmd_progress(args: argparse.Namespace) -> int:
    from .rating import rating_progress
    from .segmentation import segmentation_progress

    client = _client(args)
    if args.raters:
        done, total = rating_progress(client, args.project, args.raters)
    else:
        done, total = segmentation_progress(client, args.project)
    _print({"project": args.project, "done": done, "tasks": total})
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``madseg ls`` and its subcommands."""
    ls = subparsers.add_parser(
        "ls", help="Label Studio administration of a round (projects, pushes, ratings, masks)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ls.add_subparsers(dest="ls_command", metavar="SUBCOMMAND")
    sub.required = True

    def common(p: argparse.ArgumentParser, project: bool = True, root: bool = False) -> None:
        p.add_argument("--url", help="Label Studio URL (default $LABEL_STUDIO_URL)")
        if project:
            p.add_argument("--project", type=int, required=True, help="Label Studio project id")
        if root:
            p.add_argument("--document-root", help="Label Studio's local-files document root "
                           "(default $LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
        p.add_argument("--classes", help="class names: comma list or file (default: the 21 VOC classes)")

    p = sub.add_parser("create-round", help="create the rating + segmentation projects of round i")
    common(p, project=False, root=True)
    p.add_argument("--experiment", required=True, help="experiment name (in the project titles)")
    p.add_argument("--round", type=int, required=True, help="round number i")
    p.add_argument("--raters", type=int, default=3, help="raters per rating task (default 3)")
    p.add_argument("--sampling", default="Uniform sampling",
                   choices=["Uniform sampling", "Sequential sampling", "Uncertainty sampling"])
    p.add_argument("--storage", action="append", help="pool / overlay folder to serve (repeatable)")
    p.set_defaults(func=cmd_create_round)

    p = sub.add_parser("register-storage", help="local-files storage on a folder for a project")
    common(p, root=True)
    p.add_argument("--folder", required=True)
    p.set_defaults(func=cmd_register_storage)

    p = sub.add_parser("connect-backend", help="connect the madseg ML backend to a project")
    common(p)
    p.add_argument("--backend-url", required=True, help="URL of the ML backend as Label Studio sees it")
    p.add_argument("--basic-auth-user")
    p.add_argument("--basic-auth-password-env", default="MADSEG_BACKEND_PASSWORD",
                   help="environment variable holding the basic-auth password")
    p.set_defaults(func=cmd_connect_backend)

    for name, func, helptext in (
        ("push-rating", cmd_push_rating, "push candidates M (with overlays) into the rating project"),
        ("push-segmentation", cmd_push_segmentation, "push S (pre-annotated) into the segmentation project"),
    ):
        p = sub.add_parser(name, help=helptext)
        common(p, root=True)
        p.add_argument("--candidates", required=True, help="candidates.jsonl (lines with id and path)")
        p.add_argument("--pred-dir", required=True, help="folder with the target's <id>.png label maps")
        p.add_argument("--ids", nargs="*", help="only these image ids")
        p.add_argument("--ids-file", help="only the ids in this file (lines, a JSON list, or {'S': [...]})")
        p.add_argument("--batch-size", type=int, default=250, help="tasks per import request")
        if name == "push-rating":
            p.add_argument("--overlay-dir", required=True, help="where the overlay PNGs are written")
            p.add_argument("--alpha", type=float, default=0.55, help="overlay opacity (0..1)")
        else:
            p.add_argument("--model-version", required=True, help="target model version of the predictions")
        p.set_defaults(func=func)

    p = sub.add_parser("collect-ratings", help="ratings -> mean opinion scores (OOD veto) -> S")
    common(p)
    p.add_argument("--raters", type=int, default=3, help="raters per task (for the progress count)")
    p.add_argument("--n4", type=int, help="choose the n4 lowest-MOS images as S")
    p.add_argument("--exclude", help="file of image ids never to choose (e.g. earlier rounds' S)")
    p.add_argument("--out", help="write ratings, MOS and S to this JSON file")
    p.set_defaults(func=cmd_collect_ratings)

    p = sub.add_parser("export-masks", help="finished masks -> labelled folder (images/ + masks/)")
    common(p, root=True)
    p.add_argument("--out", required=True, help="labelled folder to write")
    p.set_defaults(func=cmd_export_masks)

    p = sub.add_parser("progress", help="how many tasks are done")
    common(p)
    p.add_argument("--raters", type=int, default=0, help="rating project: raters per task")
    p.set_defaults(func=cmd_progress)
