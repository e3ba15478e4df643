"""The deployment descriptions stay parseable and agree with the pinned stack."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import ray
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path} holds no document"


def test_ray_versions_match_the_pinned_ray():
    assert f"rayproject/ray:{ray.__version__}-" in (INFRA / "Dockerfile").read_text()
    for path in (INFRA / "kuberay").glob("*.yaml"):
        for version in re.findall(r'rayVersion: "([^"]+)"', path.read_text()):
            assert version == ray.__version__, f"{path.name} asks for Ray {version}, the project pins {ray.__version__}"


def test_no_credentials_in_infra():
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path} holds an AWS access key id"
            for value in re.findall(r"AWS_SECRET_ACCESS_KEY:\s*\"([^\"]*)\"", text):
                assert value.startswith("<"), f"{path} holds a secret value"
