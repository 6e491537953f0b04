"""Lineage you can query: what made a registered model, and which models a raw video went into.

    python -m common.lineage models:/video-dit-tiny@champion          # model version -> ... -> raw inputs
    python -m common.lineage models:/video-dit-tiny/3 --json          # the same, for machines
    python -m common.lineage --source data/demo/synthetic_a.mp4       # raw video (URI or content hash) -> models

Registration writes one ``lineage.json`` per model version (``build_lineage`` -> ``log_lineage``, an artifact of the
registration run, found through the version's run id): the workflow execution, the config (hash and the file),
the git commit and code versions, the checkpoint of every training stage with its hash, the latent dataset, the
clip manifest and its raw inputs (URI, content hash, outcome, clips cut from it). The reverse query reads the
lineage of every registered version and lists, for the raw input, its clips (from the manifest the lineage points
to), the latent datasets and checkpoints that used them and the model versions trained on it: what a takedown
request needs. Tracking URI: ``MLFLOW_TRACKING_URI``, else ``--root``'s SQLite store (the demo's ``runs``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

LINEAGE_FILE = "lineage.json"
LINEAGE_DIR = "lineage"
SCHEMA_VERSION = 1


def build_lineage(*, model: Dict[str, str], execution: Dict[str, Any], checkpoints: List[Dict[str, Any]],
                  latents: Dict[str, Any], manifest: Dict[str, Any], sources: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The lineage document of one model version (every field JSON; ``sources``: one per raw input with ``uri``,
    ``hash``, ``status`` and ``clips`` kept from it)."""
    for s in sources:
        missing = {"uri", "hash", "status"} - set(s)
        if missing:
            raise ValueError(f"build_lineage: source {s} lacks {sorted(missing)}")
    return {"schema": SCHEMA_VERSION, "model": model, "execution": execution, "checkpoints": checkpoints,
            "latents": latents, "manifest": manifest, "sources": sources,
            "counts": {"stages": len(checkpoints), "sources": len(sources),
                       "clips": int(sum(int(s.get("clips", 0)) for s in sources)),
                       "train_clips": int(latents.get("num_train", 0)), "val_clips": int(latents.get("num_val", 0))}}


def log_lineage(doc: Dict[str, Any]) -> None:
    """Log ``doc`` as ``lineage/lineage.json`` of the active MLflow run (the registration run)."""
    import mlflow

    mlflow.log_dict(doc, f"{LINEAGE_DIR}/{LINEAGE_FILE}")


def _client(root: str):
    from mlflow.tracking import MlflowClient

    from common.tracking import tracking_uri

    uri = tracking_uri(root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """``models:/<name>@<alias>`` -> (name, "alias", alias); ``models:/<name>/<version>`` -> (name, "version", v)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"expected models:/<name>@<alias> or models:/<name>/<version>, got {uri!r}")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, "alias", alias
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, "version", version
    raise ValueError(f"expected models:/<name>@<alias> or models:/<name>/<version>, got {uri!r}")


def lineage_of_version(client, name: str, version: str) -> Dict[str, Any]:
    """The lineage document registered with model version ``name``/``version``."""
    import tempfile

    mv = client.get_model_version(name, version)
    try:
        path = client.download_artifacts(mv.run_id, f"{LINEAGE_DIR}/{LINEAGE_FILE}",
                                         tempfile.mkdtemp(prefix="lineage-"))
    except Exception as e:   # MLflow raises several types for a missing artifact
        raise FileNotFoundError(f"model version {name}/{version} has no {LINEAGE_DIR}/{LINEAGE_FILE} (registered "
                                f"before lineage was recorded?): {e}") from None
    doc = json.loads(Path(path).read_text())
    doc.setdefault("model", {}).update({"name": name, "version": str(version),
                                        "aliases": sorted(getattr(mv, "aliases", []) or [])})
    return doc


def lineage_of(client, uri: str) -> Dict[str, Any]:
    name, kind, value = parse_model_uri(uri)
    if kind == "alias":
        try:
            value = client.get_model_version_by_alias(name, value).version
        except Exception as e:
            raise LookupError(f"{uri}: no such model or alias ({e})") from None
    return lineage_of_version(client, name, str(value))


def _matches(source: Dict[str, Any], needle: str) -> bool:
    return needle in (source.get("uri"), source.get("hash")) or (len(needle) >= 8 and
                                                                 str(source.get("hash", "")).startswith(needle))


def versions_using(client, needle: str, model_names: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
    """For a raw input (URI or content hash, a prefix of >= 8 hex digits is enough): every registered model version
    whose lineage lists it, with the source entry, the latent dataset and the checkpoints."""
    names = list(model_names) if model_names else [m.name for m in client.search_registered_models()]
    hits = []
    for name in names:
        for mv in client.search_model_versions(f"name='{name}'"):
            try:
                doc = lineage_of_version(client, name, mv.version)
            except FileNotFoundError:
                continue
            found = [s for s in doc.get("sources", []) if _matches(s, needle)]
            if found:
                hits.append({"model": doc["model"], "source": found[0], "latents": doc.get("latents", {}),
                             "manifest": doc.get("manifest", {}), "checkpoints": doc.get("checkpoints", [])})
    return sorted(hits, key=lambda h: (h["model"]["name"], int(h["model"]["version"])))


def clips_from(manifest_folder: str, needle: str) -> List[Dict[str, Any]]:
    """The manifest rows (clip id, status, reason, bucket) cut from a raw input; [] when the folder is gone."""
    path = Path(manifest_folder) / "manifest.parquet"
    if not manifest_folder or not path.is_file():
        return []
    import pandas as pd

    df = pd.read_parquet(path, columns=["clip_id", "source_uri", "source_hash", "status", "reason", "bucket"])
    rows = df[(df.source_uri == needle) | (df.source_hash == needle) |
              (df.source_hash.str.startswith(needle) if len(needle) >= 8 else False)]
    return [r for r in rows.drop(columns=["source_uri"]).to_dict("records") if r["clip_id"]]


def format_lineage(doc: Dict[str, Any]) -> str:
    m, ex, lat, man = doc["model"], doc.get("execution", {}), doc.get("latents", {}), doc.get("manifest", {})
    lines = [f"model {m['name']} version {m['version']}" + (f" (aliases: {', '.join(m['aliases'])})"
                                                             if m.get("aliases") else ""),
             f"  workflow execution {ex.get('flyte_execution', '?')}, MLflow parent run {ex.get('parent_run', '?')}",
             f"  config {ex.get('config_name', '?')} hash {ex.get('config_hash', '?')}"
             + (f" ({ex['config_file']})" if ex.get("config_file") else ""),
             f"  git commit {ex.get('git_commit') or 'unknown'}; code versions "
             + ", ".join(f"{k} {v}" for k, v in sorted(ex.get("code_versions", {}).items()))]
    for c in doc.get("checkpoints", []):
        lines.append(f"  <- checkpoint {c.get('stage')} step {c.get('step')} hash {c.get('content_hash')}"
                     f" (from {c.get('parent_hash') or 'scratch'})")
    lines.append(f"  <- latent dataset {lat.get('content_hash', '?')[:16]} ({lat.get('num_train', 0)} train, "
                 f"{lat.get('num_val', 0)} val clips; VAE {lat.get('vae_identity', '?')}, text encoder "
                 f"{lat.get('text_encoder_identity', '?')})")
    lines.append(f"  <- clip manifest {man.get('content_hash', '?')}: {man.get('inputs', '?')} inputs, "
                 f"{man.get('kept', '?')} kept, {man.get('rejected', '?')} rejected, {man.get('failed', '?')} failed")
    lines.append(f"  <- {len(doc.get('sources', []))} raw inputs:")
    for s in doc.get("sources", []):
        lines.append(f"       {s['uri']}  {s['hash'] or '-'}  {s['status']}  {s.get('clips', 0)} clips")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.lineage", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--source", default="", help="a raw input's URI or content hash: which models used it")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--root", default="runs", help="run folder of the local MLflow store (default: runs)")
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.source):
        parser.error("give a model URI or --source, not both")
    client = _client(args.root)
    try:
        if args.model:
            doc = lineage_of(client, args.model)
            print(json.dumps(doc, indent=1, sort_keys=True) if args.json else format_lineage(doc))
            return 0
        hits = versions_using(client, args.source)
        for h in hits:
            h["clips"] = clips_from(h["manifest"].get("folder", ""), args.source)
        if args.json:
            print(json.dumps({"source": args.source, "used_by": hits}, indent=1, sort_keys=True, default=str))
        elif not hits:
            print(f"no registered model version lists {args.source}")
        else:
            for h in hits:
                m, lat = h["model"], h["latents"]
                print(f"{m['name']} version {m['version']}: source {h['source']['uri']} ({h['source']['status']}, "
                      f"{h['source'].get('clips', 0)} clips kept); latent dataset {lat.get('content_hash', '?')[:16]}; "
                      f"checkpoints {', '.join(c.get('stage', '?') for c in h['checkpoints'])}")
                for c in h["clips"]:
                    print(f"    clip {c['clip_id']} {c['status']} {c['bucket'] or ''} {c['reason'] or ''}".rstrip())
    except (ValueError, LookupError, FileNotFoundError) as e:
        print(f"common.lineage: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
