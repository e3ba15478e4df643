"""`simplepose promote MODEL_NAME --set-name SET`: move the `champion` alias to the `candidate` version
when its COCO AP on SET beats the champion's. The decision and both numbers are recorded on the candidate."""
from __future__ import annotations

import argparse
import dataclasses
import json

from pipelines import registry, tracking


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="registered model name, e.g. simplepose-imhn")
    parser.add_argument("--set-name", required=True, help="evaluation set both versions were evaluated on")
    parser.add_argument("--metric", default="AP", help="COCO stat to compare (AP, AP50, AR, ...)")
    parser.add_argument("--candidate-alias", default="candidate",
                        help="alias of the version to promote (default %(default)s)")
    parser.add_argument("--champion-alias", default="champion",
                        help="alias moved to the candidate when it wins (default %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else the local store)")


def main(args: argparse.Namespace) -> int:
    decision = registry.promote(tracking.client(args.tracking_uri), args.model, args.set_name, args.metric,
                                args.candidate_alias, args.champion_alias)
    print(json.dumps(dataclasses.asdict(decision)))
    return 0
