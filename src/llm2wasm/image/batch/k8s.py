"""The Kubernetes manifests of a batch spec (``llm2wasm batch k8s``): a ConfigMap holding the spec,
a NetworkPolicy that shuts the conversion pods off the network, and an Indexed Job whose pod N runs
item N. The pods run as the image's unprivileged user with nothing they do not need: no service
account token, no capabilities, no privilege escalation, scratch space in an emptyDir at /tmp, the
default seccomp profile, the models read-only. The root file system stays writable: emsdk's emcc
builds the system libraries a link needs into its cache in the image on first use (the stable
image's EM_CACHE is world-writable for that), which a read-only root would break.

Runs in the image (standard library only).
"""

from __future__ import annotations

import json
import re

from llm2wasm.errors import UsageError
from llm2wasm.image.batch.spec import BatchSpec, refuse_hub_models

# the image's conversion user (images/runtime-env: USER 10001:10001)
RUN_AS = 10001
DATA = "/data"  # the claim: the spec's model and adapter folders, read-only
OUTPUT = "/data/out"  # the claim's out/ folder, the only place the pods write to (and /tmp)
SPEC_DIR = "/etc/llm2wasm"


def labels_of(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "llm2wasm", "app.kubernetes.io/instance": name}


def _resources(spec: BatchSpec) -> dict:
    """The largest any item asks for (one pod template serves every index), a GPU as the device
    plugin's resource."""
    requests: dict[str, str] = {}
    for item in spec.items:
        for key, value in item.resources.items():
            requests[key] = max(requests.get(key, value), value, key=_quantity)
    limits = {}
    if "gpu" in requests:
        limits["nvidia.com/gpu"] = requests.pop("gpu")
    resources: dict = {}
    if requests:
        resources["requests"] = dict(requests)
    if limits:
        resources["limits"] = limits
    return resources


def kubernetes_manifests(
    spec: BatchSpec,
    spec_text: str,
    *,
    image: str,
    claim: str,
    name: str = "llm2wasm-batch",
    parallelism: int = 2,
    backoff_per_index: int = 1,
) -> list[dict]:
    """A ConfigMap holding the spec, a NetworkPolicy denying the Job's pods all traffic, and an
    Indexed Job whose pod N runs item N.

    The models, adapters and outputs live on the PersistentVolumeClaim ``claim``, mounted at /data:
    the spec's paths are relative to /data, bundles go to /data/out/<model_id>/. Hub items are refused:
    the pods have no network by design and nothing runs before them that could fetch; the models
    are put on the claim first."""
    refuse_hub_models(spec, "a Kubernetes Job (its pods read the claim)")
    if parallelism < 1:
        raise UsageError(f"--parallelism {parallelism}: run at least one item at a time")
    container = {
        "name": "convert",
        "image": image,
        "args": ["batch", "run", f"{SPEC_DIR}/{spec.path.name}", "--root", DATA, "--output", OUTPUT],
        # whatever a tool writes under $HOME goes to the emptyDir, not the image
        "env": [{"name": "HOME", "value": "/tmp"}],
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            # the claim twice: read-only where the models are, writable only at out/ (kubelet
            # creates the subPath folder on the volume when it is missing)
            {"name": "data", "mountPath": DATA, "readOnly": True},
            {"name": "data", "mountPath": OUTPUT, "subPath": "out"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            # emcc's cache: a writable view in /tmp (see the module's docstring)
            "readOnlyRootFilesystem": True,
        },
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    labels = labels_of(name)
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-spec", "labels": labels},
            "data": {spec.path.name: spec_text},
        },
        # before the Job, so that `kubectl apply -f` has it in force when the first pod starts
        network_policy(name, labels),
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "completionMode": "Indexed",
                "completions": len(spec.items),
                "parallelism": min(parallelism, len(spec.items)),
                # a failed item is retried on its own and does not fail the others
                "backoffLimitPerIndex": backoff_per_index,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "restartPolicy": "Never",
                        # a conversion talks to no API server
                        "automountServiceAccountToken": False,
                        # the image's conversion user owns what it writes on the volume
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": RUN_AS,
                            "runAsGroup": RUN_AS,
                            "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [container],
                        "volumes": [
                            {"name": "spec", "configMap": {"name": f"{name}-spec"}},
                            {"name": "data", "persistentVolumeClaim": {"claimName": claim}},
                            {"name": "tmp", "emptyDir": {}},
                        ],
                    },
                },
            },
        },
    ]


def network_policy(name: str, labels: dict[str, str]) -> dict:
    """No traffic in or out of the Job's pods: a conversion reads the volume and needs no network
    (as `invoke batch` runs it with --network none). Both policy types and no rules deny all; it
    takes a network plugin that enforces NetworkPolicy."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-deny-all", "labels": labels},
        "spec": {"podSelector": {"matchLabels": dict(labels)}, "policyTypes": ["Ingress", "Egress"]},
    }


_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}


def _quantity(value: str) -> float:
    """A Kubernetes quantity as a number, to pick the largest ("500m" < "2", "16Gi" > "8G")."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    if not match or match.group(2) not in _UNITS:
        raise UsageError(f'resource quantity {value!r} is not like "4", "500m" or "16Gi"')
    return float(match.group(1)) * _UNITS[match.group(2)]


def to_yaml(documents: list[dict]) -> str:
    """YAML for the manifests (strings JSON-quoted, which YAML reads as they are)."""

    def emit(value, indent: int) -> list[str]:
        pad = " " * indent
        lines: list[str] = []
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, dict | list) and item:
                    lines.append(f"{pad}{key}:")
                    lines += emit(item, indent + 2)
                elif isinstance(item, str) and "\n" in item:
                    # a literal block, its indentation stated (a first line that starts with spaces is kept)
                    lines.append(f"{pad}{key}: |2")
                    lines += [f"{pad}  {line}" if line else "" for line in item.splitlines()]
                else:
                    lines.append(f"{pad}{key}: {scalar(item)}")
        else:
            for item in value:
                nested = emit(item, indent + 2) if isinstance(item, dict | list) and item else None
                if nested:
                    lines.append(f"{pad}- {nested[0].lstrip()}")
                    lines += nested[1:]
                else:
                    lines.append(f"{pad}- {scalar(item)}")
        return lines

    def scalar(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return str(value)
        if isinstance(value, dict):
            return "{}"
        if isinstance(value, list):
            return "[]"
        return json.dumps(value)

    return "".join("---\n" + "\n".join(emit(document, 0)) + "\n" for document in documents)
