"""infra/ manifests: they parse, carry the fields their kind needs, and point at things that exist here.

No cluster is needed: a manifest that names a module, a CLI flag or an image that the package does not have
fails here instead of at `kubectl apply` time on someone's cluster.
"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ghcr.io/ipsr-project/ipsr:{VERSION}"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay(kind: str) -> list[dict]:
    found = [d for p in sorted((INFRA / "kuberay").glob("*.yaml")) for d in docs(p) if d.get("kind") == kind]
    assert found, f"no {kind} manifest in infra/kuberay"
    return found


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_every_yaml_parses_and_every_k8s_object_has_kind_and_name():
    files = sorted(INFRA.rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        for doc in docs(path):
            if "apiVersion" in doc:
                assert doc.get("kind") and doc.get("metadata", {}).get("name"), path


def test_raycluster_has_head_cpu_and_gpu_groups_autoscaling_and_token_auth():
    import ray

    (cluster,) = kuberay("RayCluster")
    spec = cluster["spec"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert spec["rayVersion"] == ray.__version__, "manifests must run the Ray version the package is tested with"
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    head = containers(spec["headGroupSpec"]["template"])
    ports = {p["containerPort"] for p in head[0]["ports"]}
    assert {6379, 8265, 10001, 8000} <= ports
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_groups = [
        g for g in groups.values()
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(g["template"]))
    ]  # fmt: skip
    assert gpu_groups and len(gpu_groups) < len(groups), "needs a GPU group and a CPU group for Ray Data"


def test_every_container_runs_the_ipsr_image():
    objects = [d for p in sorted(INFRA.rglob("*.yaml")) for d in docs(p)]
    images = set()
    for obj in objects:
        text = yaml.safe_dump(obj)
        images.update(re.findall(r"image: (\S+)", text))
    assert images == {IMAGE}
    assert f"-t {IMAGE}" in (INFRA / "docker" / "Dockerfile").read_text()


def _cli_command(entrypoint: str) -> tuple[str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], entrypoint
    module = importlib.import_module(argv[2])
    assert callable(getattr(module, "main", None)), f"{argv[2]} has no main()"
    return argv[2].removeprefix("jobs."), argv[3:]


@pytest.mark.parametrize("job", ["preprocess", "train"])
def test_rayjob_entrypoints_name_real_modules_and_flags(job):
    """The entrypoint's flags parse with the real CLI, and the result validates as that job's config."""
    import typer.main

    from ipsr_platform.cli import main as cli

    (rayjob,) = [j for j in kuberay("RayJob") if j["metadata"]["name"] == f"ipsr-{job}"]
    (cluster,) = kuberay("RayCluster")
    assert rayjob["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    command, args = _cli_command(rayjob["spec"]["entrypoint"])
    assert command == job
    click_command = typer.main.get_command(cli.app).commands[command]
    ctx = click_command.make_context(command, list(args))  # raises on an unknown flag or a bad value
    assert ctx.params


def test_dockerfile_is_cuda_based_non_root_and_copies_what_exists():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_constraints_pin_what_the_tests_run_with():
    from importlib.metadata import version

    pins = dict(
        line.split("==", 1)
        for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for package in ("torch", "torchvision", "ray", "mlflow", "facenet-pytorch", "pyarrow"):
        assert pins.get(package) == version(package), package


def test_cluster_launcher_config_is_complete():
    (config,) = docs(INFRA / "cluster-launcher" / "aws.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands"):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"] == IMAGE
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])
    for node in config["available_node_types"].values():
        assert "InstanceType" in node["node_config"]


def test_mlflow_server_deployment_uses_basic_auth_and_its_service_selects_it():
    objects = {d["kind"]: d for d in docs(INFRA / "mlflow" / "mlflow.yaml")}
    deployment, service = objects["Deployment"], objects["Service"]
    (container,) = containers(deployment["spec"]["template"])
    assert container["command"][:2] == ["mlflow", "server"]
    assert "--app-name=basic-auth" in container["command"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_rayservice_serves_exactly_serving_serve_config_yaml():
    (service,) = kuberay("RayService")
    config = yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == config
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    from ipsr_platform.config import ServeConfig

    ServeConfig.model_validate(app["args"])  # every arg is a real ServeConfig field with a valid value
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    ports = {p["containerPort"] for p in containers(cluster["headGroupSpec"]["template"])[0]["ports"]}
    assert config["http_options"]["port"] in ports
    # The serve tokens reach every pod as a mounted Secret file (updated in place: rollover without a restart),
    # never as env.
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (container,) = containers(template)
        env = {e["name"]: e["value"] for e in container["env"]}
        mount = next(m for m in container["volumeMounts"] if env["IPSR_SERVE_TOKEN_FILE"].startswith(m["mountPath"]))
        assert volumes[mount["name"]]["secret"]["secretName"] == "ipsr-serve"
        assert "ipsr-serve" not in str(container.get("envFrom"))


def test_every_documented_serve_key_is_one_the_code_reads():
    """serve_config.yaml (and rayservice.yaml, its copy), the README: each `args` key is a ServeConfig field and each
    `user_config` key — the commented examples too — one that `Identification.reconfigure` reads."""
    from ipsr_platform.config import ServeConfig
    from serving.app import USER_CONFIG_KEYS

    text = (ROOT / "serving" / "serve_config.yaml").read_text()
    (application,) = yaml.safe_load(text)["applications"]
    assert set(application["args"]) <= set(ServeConfig.model_fields), application["args"]
    assert [d["name"] for d in application["deployments"]] == ["Ingress", "Identification"]  # what build_app names
    block = text[text.index("user_config:") + len("user_config:") :]
    documented = set(re.findall(r"^\s*#?\s*([a-z_]+):", block, flags=re.M))
    assert "generator" in documented  # the pinning example is documented…
    assert documented <= set(USER_CONFIG_KEYS), documented - set(USER_CONFIG_KEYS)  # …and read under that name
    readme = (ROOT / "README.md").read_text()
    mentioned = re.search(r"`user_config` \(([^)]*)\)", readme).group(1)
    assert set(re.findall(r"`(\w+)`", mentioned)) == set(USER_CONFIG_KEYS)
    (service,) = kuberay("RayService")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(text)
