"""The Kubernetes manifests of a batch spec: a ConfigMap with the spec, a NetworkPolicy that shuts the
pods off the network, and an Indexed Job whose pod N runs item N, as an unprivileged user with a
writable root (emsdk fills its cache) and the models read-only; every field one the Kubernetes API defines."""

from __future__ import annotations

import pytest
import yaml

from llm2wasm.errors import UsageError
from llm2wasm.image.batch import k8s as batch_k8s
from llm2wasm.image.batch.k8s import kubernetes_manifests, to_yaml
from llm2wasm.image.batch.spec import load_spec
from llm2wasm.image.cli import main as llm2wasm
from tests.unit.conftest import SPEC


def manifests(spec_dir) -> list[dict]:
    spec = load_spec(spec_dir / "models.toml")
    return kubernetes_manifests(
        spec,
        (spec_dir / "models.toml").read_text(),
        image="ghcr.io/example/llm2wasm:app",
        claim="models",
        parallelism=2,
    )


def test_kubernetes_indexed_job_field_by_field(spec_dir):
    config_map, policy, job = yaml.safe_load_all(to_yaml(manifests(spec_dir)))
    assert config_map["kind"] == "ConfigMap" and config_map["data"]["models.toml"] == SPEC
    assert policy["kind"] == "NetworkPolicy"
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 3 and spec["parallelism"] == 2
    assert spec["backoffLimitPerIndex"] == 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsUser"] == 10001
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/example/llm2wasm:app"
    # the item command; pod N gets JOB_COMPLETION_INDEX=N from Kubernetes
    assert container["args"] == [
        "batch",
        "run",
        "/etc/llm2wasm/models.toml",
        "--root",
        "/data",
        "--output",
        "/data/out",
    ]
    # the largest request of any item; a GPU as the device plugin's resource
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"nvidia.com/gpu": "1"}}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "models"
    assert volumes["spec"]["configMap"]["name"] == config_map["metadata"]["name"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert mounts == {"/etc/llm2wasm": "spec", "/data": "data", "/data/out": "data", "/tmp": "tmp"}


def unknown_fields(value, type_name: str, where: str = "") -> list[str]:
    """Keys of a manifest that the Kubernetes API does not define, read from the official client's
    models (generated from the API's OpenAPI schema)."""
    import kubernetes.client as models

    if type_name.startswith(("List[", "list[")):
        inner = type_name[5:-1]
        return [problem for n, item in enumerate(value) for problem in unknown_fields(item, inner, f"{where}[{n}]")]
    if type_name.startswith(("Dict[", "dict(")) or type_name in {"str", "int", "bool", "object", "float"}:
        return []
    model = getattr(models, type_name)
    by_json_key = {json_key: attr for attr, json_key in model.attribute_map.items()}
    problems = []
    for key, item in value.items():
        if key not in by_json_key:
            problems.append(f"{where}.{key}")
        else:
            problems += unknown_fields(item, model.openapi_types[by_json_key[key]], f"{where}.{key}")
    return problems


def test_every_field_is_one_the_kubernetes_api_defines(spec_dir):
    config_map, policy, job = yaml.safe_load_all(to_yaml(manifests(spec_dir)))
    assert unknown_fields(config_map, "V1ConfigMap") == []
    assert unknown_fields(policy, "V1NetworkPolicy") == []
    assert unknown_fields(job, "V1Job") == []
    job["spec"]["template"]["spec"]["containers"][0]["argz"] = []  # the check can fail
    assert unknown_fields(job, "V1Job") == [".spec.template.spec.containers[0].argz"]


def pod_of(spec_dir) -> tuple[dict, dict]:
    *_, job = yaml.safe_load_all(to_yaml(manifests(spec_dir)))
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_the_pod_runs_unprivileged_with_nothing_it_does_not_need(spec_dir):
    pod, container = pod_of(spec_dir)
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,  # the image's conversion user
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["runAsNonRoot"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True  # emcc's cache: a view in the /tmp emptyDir
    # the one writable scratch place, and $HOME pointed at it
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    assert {"name": "HOME", "value": "/tmp"} in container["env"]


def test_the_models_and_the_spec_are_mounted_read_only_and_only_out_is_writable(spec_dir):
    _, container = pod_of(spec_dir)
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts["/etc/llm2wasm"]["readOnly"] is True
    assert mounts["/data"]["readOnly"] is True and "subPath" not in mounts["/data"]
    assert mounts["/data/out"] == {"name": "data", "mountPath": "/data/out", "subPath": "out"}
    writable = sorted(path for path, mount in mounts.items() if not mount.get("readOnly"))
    assert writable == ["/data/out", "/tmp"]
    # the item command writes its bundles where the claim is writable
    args = container["args"]
    assert args[args.index("--output") + 1] == "/data/out" and args[args.index("--root") + 1] == "/data"


def test_a_network_policy_denies_the_jobs_pods_all_traffic(spec_dir):
    _, policy, job = yaml.safe_load_all(to_yaml(manifests(spec_dir)))
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["metadata"]["name"] == "llm2wasm-batch-deny-all"
    # it selects the Job's pods by the labels they carry
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"] == {"matchLabels": pod_labels}
    assert pod_labels["app.kubernetes.io/instance"] == "llm2wasm-batch"
    # both directions governed, and no rule allows anything
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in policy["spec"] and "egress" not in policy["spec"]


def test_the_k8s_command_prints_the_three_documents(spec_dir, capsys):
    command = ["batch", "k8s", str(spec_dir / "models.toml"), "--image", "img", "--name", "nightly"]
    assert llm2wasm(command) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [document["kind"] for document in documents] == ["ConfigMap", "NetworkPolicy", "Job"]
    assert documents[1]["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "nightly"


def test_quantities_compare_by_value():
    assert batch_k8s._quantity("500m") < batch_k8s._quantity("2") < batch_k8s._quantity("3")
    assert batch_k8s._quantity("16Gi") > batch_k8s._quantity("16G")
    with pytest.raises(UsageError, match="not like"):
        batch_k8s._quantity("lots")
