"""Move the champion alias: the gate's decision (``promote``), by hand, and back (``rollback``).

    python -m tasks.register.promote video-dit-tiny 3               # version 3 becomes the champion, by hand
    python -m tasks.register.promote video-dit-tiny --rollback      # the champion goes back to the one it replaced
    python -m tasks.register.promote video-dit-tiny --show          # the champion and its history

Every move tags the new champion's version with ``gate.decision`` (why), ``gate.previous_champion`` (the version it
replaced, "" for the first) and ``gate.promoted_at``, so a rollback knows where to go and the history can be read
back from the registry alone. Tracking URI: ``MLFLOW_TRACKING_URI``, else ``--root``'s SQLite store.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Sequence

CHAMPION = "champion"


def registry_client(root: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    from common.tracking import tracking_uri

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def current_champion(client, name: str, alias: str = CHAMPION) -> Optional[str]:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(client, name: str, version: str, decision: str, alias: str = CHAMPION) -> Optional[str]:
    """Give ``version`` the champion alias, recording why and which version it replaced; returns that version."""
    client.get_model_version(name, version)   # raises for an unknown version
    previous = current_champion(client, name, alias)
    if previous == str(version):
        return previous
    client.set_model_version_tag(name, version, "gate.decision", decision)
    client.set_model_version_tag(name, version, "gate.previous_champion", previous or "")
    client.set_model_version_tag(name, version, "gate.promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    client.set_registered_model_alias(name, alias, version)
    return previous


def rollback(client, name: str, alias: str = CHAMPION) -> str:
    """Move the champion alias back to the version the current champion replaced; returns it."""
    current = current_champion(client, name, alias)
    if current is None:
        raise LookupError(f"{name} has no {alias}: nothing to roll back")
    previous = client.get_model_version(name, current).tags.get("gate.previous_champion", "")
    if not previous:
        raise LookupError(f"{name} version {current} was the first {alias}: there is no earlier one to roll back to")
    client.set_registered_model_alias(name, alias, previous)
    client.set_model_version_tag(name, current, "gate.rolled_back", f"{alias} moved back to version {previous}")
    return previous


def history(client, name: str, alias: str = CHAMPION) -> List[str]:
    """The champion and the versions it replaced, newest first."""
    chain: List[str] = []
    current = current_champion(client, name, alias)
    while current and current not in chain:
        chain.append(current)
        current = client.get_model_version(name, current).tags.get("gate.previous_champion", "")
    return chain


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.register.promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="registered model name, e.g. video-dit-tiny")
    parser.add_argument("version", nargs="?", help="the version to make champion")
    parser.add_argument("--rollback", action="store_true", help="move the champion back to the one it replaced")
    parser.add_argument("--show", action="store_true", help="print the champion and its history")
    parser.add_argument("--alias", default=CHAMPION)
    parser.add_argument("--root", default="runs", help="run folder of the local MLflow store (default: runs)")
    args = parser.parse_args(argv)
    if sum([bool(args.version), args.rollback, args.show]) != 1:
        parser.error("give a version, --rollback or --show")
    client = registry_client(args.root)
    try:
        if args.show:
            chain = history(client, args.name, args.alias)
            print(f"{args.name}@{args.alias}: " + (" <- ".join(f"v{v}" for v in chain) if chain else "none"))
        elif args.rollback:
            print(f"{args.name}@{args.alias} -> version {rollback(client, args.name, args.alias)}")
        else:
            previous = promote(client, args.name, args.version, "promoted by hand", args.alias)
            print(f"{args.name}@{args.alias} -> version {args.version} (was {previous or 'none'})")
    except LookupError as e:
        print(f"tasks.register.promote: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:   # MlflowException for an unknown model or version
        print(f"tasks.register.promote: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
