"""A rendering's pods run as local processes, changed only where a machine
differs from a cluster: each mount is a temporary directory (a Secret's
holds its keys as files, a ConfigMap's its data), and the cluster's names
and wildcard addresses of etcd move to loopback ports. Every value is then
checked to name nothing of the cluster any more, so a setting this moving
does not know fails the test instead of passing unread."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from discovery.etcd_server import etcd_binary, free_ports
from tests.harness.k8s_render import container, expand, find, pod_env, volumes

HOST = "127.0.0.1"
MEMBER = re.compile(r"kvbm-etcd-(\d+)\.kvbm-etcd\.kvbm\.svc:(2379|2380)")
WILDCARD = re.compile(r"0\.0\.0\.0:(2379|2380|2381)")
# a cluster's names, its wildcard address, and absolute paths of a pod (not
# the same words inside a path moved under a temporary directory)
CLUSTER_ONLY = re.compile(r"kvbm\.svc|0\.0\.0\.0|(?<![\w./-])/(?:etc|var|run|dev)/")


class PodFiles:
    """Where a pod's mount paths are on this machine, and the same move for
    any value that names them (the longest mount first: /etc/kvbm/node.toml
    before /etc/kvbm)."""

    def __init__(
        self,
        workload: dict,
        docs: list[dict],
        root: Path,
        secrets: Mapping[str, Path],
        claims: Mapping[str, Path] | None = None,
        rewrite: Callable[[str], str] = str,
    ) -> None:
        """`claims`: a directory for each volume claim's mount; `rewrite`:
        what else changes in a ConfigMap's data (etcd's addresses, say)."""
        claims = claims or {}
        self.paths: dict[str, Path] = {}
        maps: list[tuple[Path, dict[str, str]]] = []
        vols = volumes(workload) if "volumes" in workload["spec"]["template"]["spec"] else {}
        for m in container(workload)["volumeMounts"]:
            here = root / m["name"]
            v = vols.get(m["name"], {})
            if "secret" in v:
                here = secrets[v["secret"]["secretName"]]
            elif "configMap" in v:
                here.mkdir(parents=True)
                maps.append((here, find(docs, "ConfigMap", v["configMap"]["name"])["data"]))
                here = here / m["subPath"] if "subPath" in m else here
            elif m["name"] in claims:
                here = claims[m["name"]]
            else:
                here.mkdir(parents=True)  # a hostPath or an emptyDir
            self.paths[m["mountPath"]] = here
        for here, data in maps:  # once every mount is known: the data names them
            for key, text in data.items():
                (here / key).write_text(self.move(rewrite(text)))

    def move(self, text: str) -> str:
        """In one pass, so a moved path is never moved again (/tmp is a mount too)."""
        pod_paths = "|".join(re.escape(p) for p in sorted(self.paths, key=len, reverse=True))
        pattern = rf"(?<![\w./-])({pod_paths})(?![\w.-])"
        return re.sub(pattern, lambda m: str(self.paths[m[1]]), text)


def names_nothing_of_the_cluster(values: Mapping[str, str], what: str) -> None:
    for name, value in values.items():
        left = CLUSTER_ONLY.findall(value)
        assert not left, f"{what}: {name}={value} still names {left}: move it too"


class EtcdMembers:
    """The rendering's etcd StatefulSet, one `etcd` per replica on loopback
    ports, with the container's flags and ETCD_* variables and its mounts
    (the Secrets given, a data directory per member). Stops every member."""

    def __init__(self, docs: list[dict], root: Path, secrets: Mapping[str, Path]) -> None:
        self.sts = find(docs, "StatefulSet", "kvbm-etcd")
        self.docs, self.root, self.secrets = docs, root, secrets
        root.mkdir(parents=True)
        n = self.sts["spec"]["replicas"]
        ports = iter(free_ports(HOST, 3 * n))
        self.ports = [{p: next(ports) for p in ("2379", "2380", "2381")} for _ in range(n)]
        self.procs: list[subprocess.Popen] = []

    def address(self, text: str) -> str:
        """`text` with each member's cluster name and port moved to loopback;
        a member the StatefulSet does not run to port 1, where nothing answers."""

        def moved(m: re.Match) -> str:
            i = int(m[1])
            return f"{HOST}:{self.ports[i][m[2]] if i < len(self.ports) else 1}"

        return MEMBER.sub(moved, text)

    @property
    def endpoints(self) -> list[str]:
        return [f"{HOST}:{p['2379']}" for p in self.ports]

    def start(self, timeout: float = 30.0) -> None:
        c = container(self.sts)
        for i, ports in enumerate(self.ports):
            claims = {"data": self.root / f"data-{i}"}
            files = PodFiles(self.sts, self.docs, self.root / f"pod-{i}", self.secrets, claims)

            def here(text: str, ports: dict = ports, files: PodFiles = files) -> str:
                text = WILDCARD.sub(lambda m: f"{HOST}:{ports[m[1]]}", self.address(text))
                return files.move(text)

            pod = pod_env(c, {"POD_NAME": f"kvbm-etcd-{i}"})
            env = {k: here(v) for k, v in pod.items()}
            args = {f"arg {a}": here(expand(a, pod)) for a in c["command"][1:]}
            names_nothing_of_the_cluster(env | args, f"etcd member {i}")
            log = open(self.root / f"etcd-{i}.log", "wb")  # noqa: SIM115 (the child holds it)
            base = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
            self.procs.append(
                subprocess.Popen(
                    [etcd_binary(), *args.values()], env=base | env, stdout=log, stderr=log
                )
            )
            log.close()
        self._wait_healthy(time.monotonic() + timeout)

    def _wait_healthy(self, deadline: float) -> None:
        for i, ports in enumerate(self.ports):
            while not self._healthy(ports["2381"]):
                if time.monotonic() > deadline or self.procs[i].poll() is not None:
                    raise AssertionError(f"etcd member {i} never became healthy: {self.log(i)}")
                time.sleep(0.1)

    @staticmethod
    def _healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def log(self, i: int) -> str:
        return (self.root / f"etcd-{i}.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for i in range(len(self.ports)):
            shutil.rmtree(self.root / f"data-{i}", ignore_errors=True)

    def __enter__(self) -> EtcdMembers:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
