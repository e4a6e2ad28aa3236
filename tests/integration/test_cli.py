"""The `kvbm` command as a user runs it: real processes, real output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KVBM = [sys.executable, "-m", "kvbm.cli"]


def run(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*KVBM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def demo_rows(out: str) -> dict[str, list[int]]:
    """The summary table: phase -> local host, local disk, remote host, remote
    disk, computed, seconds, checked, wrong."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("engine "):
            title, numbers = line[:32].strip(), line[32:].split()
            rows[title] = [int(x) if x.isdigit() else -1 for x in numbers]
    return rows


def test_the_demo_serves_a_prompt_from_a_peers_host_and_disk_then_locally():
    r = run(
        "demo",
        "--engine",
        "synthetic",
        "--prompts",
        "6",
        "--blocks-per-prompt",
        "8",
        "--host-cache-mb",
        "2",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = demo_rows(r.stdout)
    first, second, third = (
        rows[t]
        for t in (
            "engine 1 on node A computes",
            "engine 2 on node B asks",
            "engine 2 on node B asks again",
        )
    )
    assert first[4] == 48 and first[:4] == [0, 0, 0, 0]  # everything computed once
    assert second[2] > 0 and second[3] > 0 and second[4] == 0  # A's host and A's disk
    assert third[0] == 48  # then local hits on B
    assert [row[-1] for row in (first, second, third)] == [0, 0, 0]  # nothing wrong
    assert second[-2] == 48 and third[-2] == 48  # every loaded block checked


@pytest.mark.parametrize("layout", ["LBHNC", "BHLNC", "MLA"])
def test_bench_tiers_prints_one_json_object_with_every_figure(tmp_path, layout):
    args = ["--blocks", "8", "--reps", "1", "--dir", str(tmp_path), "--layout", layout]
    r = run("bench", "tiers", "--json", *args)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["layout"] == layout
    for key in (
        "memcpy_gbps",
        "g1_to_g2_gbps",
        "g2_to_g1_gbps",
        "g2_to_g3_gbps",
        "g3_to_g2_gbps",
        "disk_read_gbps",
        "disk_write_gbps",
        "bookkeeping_us_per_block",
        "g1_to_g2_vs_memcpy",
        "g2_to_g1_vs_memcpy",
        "g1_to_g2_scattered_vs_memcpy",
        "g2_to_g1_scattered_vs_memcpy",
        "g2_to_g3_vs_disk",
        "g3_to_g2_vs_disk",
    ):
        assert result[key] > 0, key
    # the bench cleans up after itself
    assert os.listdir(tmp_path) == []


def test_bench_engines_settles_every_lease_and_prints_every_figure():
    r = run("bench", "engines", "--json", "--engines", "2", "--seconds", "0.5")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for key in (
        "raw_socket_roundtrip_us",
        "scheduler_lookup_p50_us",
        "rpc_vs_socket_roundtrip",
        "lookups_per_s",
        "load_release_per_s",
        "stores_per_s",
        "scheduler_miss_p50_us",
        "node_cpu_us_per_node_lookup",
    ):
        assert result[key] > 0, key
    assert result["leases_left"] == 0
    assert result["lookups_wrong"] == 0
    # every phase started once both engines were ready, and both took part in each
    for kind in ("lookup", "miss", "node_lookup", "load", "store"):
        assert result[f"{kind}_engines"] == 2, kind
    assert result["engines_absent"] == []
    assert result["engines_ready_s"] > 0


def test_bench_engines_with_phases_of_no_time_reports_zeros_not_an_error():
    r = run("bench", "engines", "--json", "--engines", "2", "--seconds", "0")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    # both engines took part in every phase and made no call in it
    assert result["lookup_engines"] == result["store_engines"] == 2
    assert result["lookups_per_s"] == result["load_release_per_s"] == 0
    assert result["lookup_p50_us"] is None
    assert result["node_cpu_us_per_store"] is None
    assert result["leases_left"] == 0


def test_bench_engines_names_the_engines_not_ready_in_json_not_a_traceback():
    # no engine process imports and attaches within 0 s
    r = run("bench", "engines", "--json", "--engines", "2", "--ready-timeout", "0")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    result = json.loads(r.stdout)
    assert result["error"] == "2 engine(s) not ready within 0 s; no phase was run"
    assert result["not_ready"] == [
        {"engine": 0, "why": "not ready after 0 s"},
        {"engine": 1, "why": "not ready after 0 s"},
    ]
    assert "lookups_per_s" not in result


def test_config_prints_the_merged_configuration(tmp_path):
    r = run("config", "--host-cache-mb", "77", env={"KVBM_NAMESPACE": "tenant-a"})
    assert r.returncode == 0, r.stderr
    assert "host_cache_mb = 77" in r.stdout
    assert 'namespace = "tenant-a"' in r.stdout


def test_bad_flag_value_is_a_clear_error_not_a_traceback():
    r = run("config", "--host-cache-mb", "lots")
    assert r.returncode == 2
    assert "host_cache_mb: expected an integer" in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_with_an_impossible_disk_tier_fails_cleanly(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    r = run("demo", "--disk-cache-dir", str(tmp_path / "file"), "--prompts", "1")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "kvbm:" in r.stderr


def test_bench_with_a_missing_directory_is_a_clear_error():
    r = run("bench", "tiers", "--json", "--blocks", "2", "--reps", "1", "--dir", "/nonexistent/x")
    assert r.returncode == 2
    assert "kvbm:" in r.stderr and "Traceback" not in r.stderr


def test_gpu_check_without_a_cuda_device_says_so_before_installing_anything(tmp_path):
    """scripts/gpu-check stops at its first line where nvidia-smi lists no
    GPU (PATH here: grep only), and the check itself where torch sees none."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    grep = subprocess.run(["which", "grep"], capture_output=True, text=True).stdout.strip()
    (bin_dir / "grep").symlink_to(grep)
    r = subprocess.run(
        ["/bin/bash", os.path.join(root, "scripts", "gpu-check")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(bin_dir)},
    )
    assert r.returncode == 3, r.stderr
    assert json.loads(r.stdout) == {
        "check": "gpu",
        "ok": False,
        "reason": "no CUDA device (nvidia-smi lists no GPU)",
    }
    assert "installing" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "kvbm.gpu_check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.returncode == 3, r.stderr
    assert json.loads(r.stdout)["reason"].startswith("no CUDA device")


def test_gpu_check_whose_install_fails_says_why_in_its_json_line(tmp_path):
    """With a GPU listed (a stand-in nvidia-smi) and no usable Python to
    install with, the script still ends with one JSON line naming why."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shim = tmp_path / "nvidia-smi"
    shim.write_text("#!/bin/sh\necho 'GPU 0: stand-in (UUID: GPU-0)'\n")
    shim.chmod(0o755)
    r = subprocess.run(
        ["/bin/bash", os.path.join(root, "scripts", "gpu-check")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": "/bin/false"},
    )
    assert r.returncode == 4, r.stderr
    line = json.loads(r.stdout)
    assert line["ok"] is False and line["reason"].startswith("install failed: Python >= 3.11")
