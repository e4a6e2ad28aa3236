"""One configuration object, merged in one place: defaults < file < environment <
overrides, one name per setting everywhere."""

from __future__ import annotations

import pytest

from kvbm.config import KvbmConfig, load_config, reference_table, to_toml


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
    ],
)
def test_bad_settings_name_themselves(source, message):
    with pytest.raises(ValueError, match=message):
        load_config(env=source.get("env", {}), overrides=source.get("overrides"))


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


def test_readme_carries_the_generated_reference():
    with open("README.md") as f:
        readme = f.read()
    assert reference_table() in readme, "README config table is stale: kvbm config --reference"


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
