"""One configuration object, merged in one place: defaults < file < environment <
overrides, one name per setting everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvbm
from discovery.tier import Tier
from kvbm.config import ConfigError, EngineCopies, IndexLayout, KvbmConfig, LogLevel, load_config
from kvbm.config_text import reference_table, to_toml
from kvbm.errors import KvbmError


def test_layers_merge_in_order(tmp_path):
    f = tmp_path / "kvbm.toml"
    f.write_text('host_cache_mb = 64\nnamespace = "from-file"\ndisk_direct_io = false\n')
    env = {"KVBM_HOST_CACHE_MB": "128", "KVBM_LOG_LEVEL": "info", "PATH": "/bin"}
    cfg = load_config(str(f), env=env, overrides={"host_cache_mb": 256, "namespace": None})
    # flag beats environment beats file beats default; None means "flag not given"
    assert cfg.host_cache_mb == 256
    assert cfg.log_level == "info"
    assert cfg.namespace == "from-file"
    assert cfg.disk_direct_io is False
    assert cfg.disk_admit_min_uses == KvbmConfig().disk_admit_min_uses


def test_command_defaults_sit_below_everything_else():
    cfg = load_config(
        env={"KVBM_HOST_CACHE_MB": "8"}, defaults={"host_cache_mb": 32, "disk_cache_mb": 0}
    )
    assert cfg.host_cache_mb == 8


def test_dashes_in_override_keys_are_accepted():
    assert load_config(env={}, overrides={"host-cache-mb": "12"}).host_cache_mb == 12


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"overrides": {"no_such_key": 1}}, "unknown setting 'no_such_key'"),
        ({"overrides": {"host_cache_mb": "lots"}}, "host_cache_mb: expected an integer"),
        ({"overrides": {"host_cache_mb": True}}, "host_cache_mb: expected an integer"),
        ({"overrides": {"disk_direct_io": "maybe"}}, "disk_direct_io: expected a boolean"),
        ({"overrides": {"host_cache_mb": 0}}, "host_cache_mb must be at least 1"),
        ({"overrides": {"disk_cache_mb": 10}}, "disk_cache_dir is empty"),
        ({"overrides": {"namespace": "a/b"}}, "namespace must match"),
        ({"overrides": {"log_level": "loud"}}, "log_level must be one of"),
        ({"env": {"KVBM_DISK_CACHE_MB": "-1"}}, "disk_cache_mb must be >= 0"),
        (
            {"env": {"KVBM_INDEX_LAYOUT": "ring"}},
            r"index_layout must be one of mirror, sharded, got 'ring' \(in the environment\)",
        ),
        (
            {"overrides": {"engine_copies": "later"}},
            "engine_copies must be one of auto, sync, async",
        ),
        ({"overrides": {"remote_tiers": "host,gpu"}}, "remote_tiers may name host and disk only"),
        ({"overrides": {"listen": "nowhere"}}, "listen must be HOST:PORT"),
    ],
)
def test_bad_settings_name_themselves(source, message):
    # one error type for every bad setting, foreign checks (the namespace's) included
    with pytest.raises(ConfigError, match=message):
        load_config(env=source.get("env", {}), overrides=source.get("overrides"))


def test_a_config_error_is_a_value_error_and_a_kvbm_error():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, KvbmError)


def test_word_settings_are_enums_equal_to_their_words():
    cfg = load_config(
        env={"KVBM_INDEX_LAYOUT": "sharded"},
        overrides={"engine_copies": "async", "log_level": "error"},
    )
    assert cfg.index_layout is IndexLayout.SHARDED and cfg.index_layout == "sharded"
    assert cfg.engine_copies is EngineCopies.ASYNC
    assert cfg.log_level is LogLevel.ERROR
    # built directly (tests, benches), a word becomes its member too
    assert KvbmConfig(index_layout="sharded").index_layout is IndexLayout.SHARDED
    assert KvbmConfig(index_layout="sharded") == KvbmConfig(index_layout=IndexLayout.SHARDED)
    with pytest.raises(ConfigError, match="log_level must be one of"):
        KvbmConfig(log_level="INFO")  # the words are exact
    assert load_config(env={}, overrides={"remote_tiers": "disk, host"}).remote_tier_list == (
        Tier.DISK,
        Tier.HOST,
    )


def test_bad_file_is_a_clear_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("host_cache_mb = = 3")
    with pytest.raises(ValueError, match="cannot read config file"):
        load_config(str(f), env={})
    with pytest.raises(ValueError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.toml"), env={})
    f.write_text("typo_mb = 3")
    with pytest.raises(ValueError, match="unknown setting 'typo_mb' in"):
        load_config(str(f), env={})


def test_unknown_environment_variables_are_ignored_with_a_warning(caplog):
    cfg = load_config(env={"KVBM_HOST_CACHE": "5"})
    assert cfg == KvbmConfig()
    assert "KVBM_HOST_CACHE" in caplog.text


def test_toml_round_trip(tmp_path):
    cfg = load_config(
        env={},
        overrides={"namespace": "m1", "disk_cache_dir": "/var/kvbm", "disk_cache_mb": 5},
    )
    f = tmp_path / "out.toml"
    f.write_text(to_toml(cfg))
    assert load_config(str(f), env={}) == cfg


def test_operations_doc_carries_the_generated_reference():
    """The table between the markers in docs/operations.md is exactly what
    `kvbm config --reference` prints: a setting added, renamed or re-documented
    in kvbm/config.py without regenerating the table fails here."""
    doc = (Path(kvbm.__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    begin = doc.index("<!-- BEGIN generated: `kvbm config --reference`")
    end = doc.index("<!-- END generated -->")
    table = doc[doc.index("\n", begin) : end].strip()
    assert table == reference_table(), (
        "docs/operations.md's configuration reference is stale: paste `kvbm config --reference`"
    )


def test_a_fractional_size_is_refused_not_truncated(tmp_path):
    f = tmp_path / "kvbm.toml"
    f.write_text("host_cache_mb = 1.9\n")
    with pytest.raises(ValueError, match="host_cache_mb: expected an integer"):
        load_config(str(f), env={})
    with pytest.raises(ValueError, match="host_cache_mb: expected an integer"):
        load_config(env={"KVBM_HOST_CACHE_MB": "1.9"})


def test_a_shared_group_must_exist():
    assert load_config(env={}, overrides={"shared_group": "nogroup"}).shared_gid == 65534
    assert load_config(env={}, overrides={"shared_group": "1234"}).shared_gid == 1234
    with pytest.raises(ValueError, match="shared_group: no group"):
        load_config(env={}, overrides={"shared_group": "no-such-group-kvbm"})


def test_etcd_tls_settings():
    cfg = KvbmConfig(etcd="https://e1:2379,e2:2379", etcd_ca_file="/ca.crt")
    assert cfg.etcd_endpoints == ("e1:2379", "e2:2379")
    assert cfg.etcd_tls is not None and cfg.etcd_tls.ca_file == "/ca.crt"
    assert KvbmConfig(etcd="e1:2379").etcd_tls is None
    with pytest.raises(ValueError, match="need etcd_ca_file"):
        KvbmConfig(etcd="https://e1:2379")
    with pytest.raises(ValueError, match="needs the CA"):
        KvbmConfig(etcd="e1:2379", etcd_cert_file="/c.crt", etcd_key_file="/c.key")
    with pytest.raises(ValueError, match="needs its key"):
        KvbmConfig(etcd="e1:2379", etcd_ca_file="/ca.crt", etcd_cert_file="/c.crt")
