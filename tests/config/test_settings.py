"""relay.config.settings: RELAY_* variables and the optional TOML file into one frozen
Settings, each setting declared once."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from relay.config.endpoints import Endpoint, UpstreamTarget, parse_endpoint, parse_upstream_url
from relay.config.parsers import SettingsError
from relay.config.settings import SETTINGS, Settings, load_settings

SECRET = "hunter2-s3cret"


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- defaults and every variable ---------------------------------------------------------------
def test_load_settings_defaults_with_empty_environ() -> None:
    """With no RELAY_* variable and no file, the embedded development defaults apply."""
    settings = load_settings(environ={})
    assert settings.listen == Endpoint("127.0.0.1", 2525)
    assert settings.smtps_listen is None
    assert settings.redis_url is None
    assert settings.upstream is None
    assert settings.state_dir == Path(".relay-state")
    assert settings.policies_dir == Path("policies")
    assert settings.allow_plaintext_auth is False
    assert settings.tls_cert is None and settings.tls_key is None
    assert settings.default_tz == "UTC"
    assert settings.max_message_size == 25 * 1024 * 1024
    assert settings.max_recipients == 500
    assert settings.idle_timeout == 300.0
    assert settings.upstream_pool_size == 20
    assert settings.upstream_timeout == 30.0
    assert settings.upstream_tls_verify is True
    assert settings.upstream_ca_file is None
    assert settings.redis_timeout == 2.0
    assert settings.log_format == "auto"
    assert settings.log_level == "info"
    assert settings.hostname


def test_load_settings_parses_every_variable() -> None:
    """Every RELAY_* variable is read and converted to its typed value."""
    environ = {
        "RELAY_LISTEN": "127.0.0.1:2526",
        "RELAY_SMTPS_LISTEN": "[::1]:4650",
        "RELAY_REDIS_URL": "redis://127.0.0.1:6390/3",
        "RELAY_UPSTREAM_URL": "smtps://mail.example.test:4465",
        "RELAY_STATE_DIR": "/var/lib/relay",
        "RELAY_POLICIES_DIR": "/etc/relay/policies",
        "RELAY_ALLOW_PLAINTEXT_AUTH": "yes",
        "RELAY_TLS_CERT": "/etc/relay/cert.pem",
        "RELAY_TLS_KEY": "/etc/relay/key.pem",
        "RELAY_HOSTNAME": "relay.example.test",
        "RELAY_DEFAULT_TZ": "America/Los_Angeles",
        "RELAY_MAX_MESSAGE_SIZE": "1048576",
        "RELAY_MAX_RECIPIENTS": "50",
        "RELAY_IDLE_TIMEOUT": "12.5",
        "RELAY_UPSTREAM_POOL_SIZE": "3",
        "RELAY_UPSTREAM_TIMEOUT": "7",
        "RELAY_UPSTREAM_TLS_VERIFY": "off",
        "RELAY_UPSTREAM_CA_FILE": "/etc/relay/ca.pem",
        "RELAY_REDIS_TIMEOUT": "0.5",
        "RELAY_LOG_FORMAT": "json",
        "RELAY_LOG_LEVEL": "debug",
    }
    settings = load_settings(environ=environ)
    assert settings.listen == Endpoint("127.0.0.1", 2526)
    assert settings.smtps_listen == Endpoint("::1", 4650)
    assert settings.redis_url == "redis://127.0.0.1:6390/3"
    assert settings.upstream == UpstreamTarget("mail.example.test", 4465, "implicit")
    assert settings.state_dir == Path("/var/lib/relay")
    assert settings.policies_dir == Path("/etc/relay/policies")
    assert settings.allow_plaintext_auth is True
    assert settings.tls_cert == Path("/etc/relay/cert.pem")
    assert settings.tls_key == Path("/etc/relay/key.pem")
    assert settings.hostname == "relay.example.test"
    assert settings.default_tz == "America/Los_Angeles"
    assert settings.max_message_size == 1048576
    assert settings.max_recipients == 50
    assert settings.idle_timeout == 12.5
    assert settings.upstream_pool_size == 3
    assert settings.upstream_timeout == 7.0
    assert settings.upstream_tls_verify is False
    assert settings.upstream_ca_file == Path("/etc/relay/ca.pem")
    assert settings.redis_timeout == 0.5
    assert settings.log_format == "json"
    assert settings.log_level == "debug"


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:2525", Endpoint("127.0.0.1", 2525)),
    ("0.0.0.0:25", Endpoint("0.0.0.0", 25)),
    ("[::1]:2525", Endpoint("::1", 2525)),
    ("[::]:587", Endpoint("::", 587)),
    ("localhost:2525", Endpoint("127.0.0.1", 2525)),
    ("127.0.0.1:0", Endpoint("127.0.0.1", 0)),
])
def test_parse_endpoint_accepts_ip_literals(text: str, expected: Endpoint) -> None:
    """host:port and [v6]:port with an IP literal (or localhost) parse to an Endpoint."""
    assert parse_endpoint(text) == expected


def test_endpoint_str_brackets_ipv6() -> None:
    """An IPv6 endpoint prints as [v6]:port so it can be parsed back."""
    assert str(Endpoint("::1", 2525)) == "[::1]:2525"
    assert parse_endpoint(str(Endpoint("::1", 2525))) == Endpoint("::1", 2525)
    assert str(Endpoint("127.0.0.1", 25)) == "127.0.0.1:25"


@pytest.mark.parametrize(("url", "expected"), [
    ("smtp://127.0.0.1", UpstreamTarget("127.0.0.1", 25, "none")),
    ("smtp://mail.example.test:2525", UpstreamTarget("mail.example.test", 2525, "none")),
    ("smtp+starttls://mail.example.test", UpstreamTarget("mail.example.test", 587, "starttls")),
    ("smtps://mail.example.test", UpstreamTarget("mail.example.test", 465, "implicit")),
    ("smtp+starttls://user:pass@mail.example.test:587",
     UpstreamTarget("mail.example.test", 587, "starttls", "user", "pass")),
    ("smtp+starttls://apikey%40kw:p%40ss%3Aw%2Fo%25rd@mail.example.test:587",
     UpstreamTarget("mail.example.test", 587, "starttls", "apikey@kw", "p@ss:w/o%rd")),
    ("smtps://[::1]:4465", UpstreamTarget("::1", 4465, "implicit")),
])
def test_parse_upstream_url_schemes_ports_and_credentials(url: str,
                                                          expected: UpstreamTarget) -> None:
    """Each scheme maps to its TLS mode and default port; credentials are percent-decoded."""
    assert parse_upstream_url(url) == expected


def test_load_settings_upstream_url_from_environment() -> None:
    """RELAY_UPSTREAM_URL becomes Settings.upstream with the decoded password."""
    settings = load_settings(environ={
        "RELAY_UPSTREAM_URL": "smtp+starttls://user:p%40ss%3Aword@mail.example.test:587"})
    assert settings.upstream == UpstreamTarget("mail.example.test", 587, "starttls",
                                               "user", "p@ss:word")


@pytest.mark.parametrize("url", [
    "http://mail.example.test",
    "smtp://",
    "smtp://user@mail.example.test",
    "smtp://mail.example.test:99999",
    "smtp://mail.example.test:port",
])
def test_parse_upstream_url_rejects_malformed(url: str) -> None:
    """A wrong scheme, no host, a user without password or a bad port is a SettingsError."""
    with pytest.raises(SettingsError):
        parse_upstream_url(url)


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_load_settings_bool_spellings(value: str, expected: bool) -> None:
    """Booleans accept 1/0, true/false, yes/no, on/off in any case."""
    settings = load_settings(environ={"RELAY_UPSTREAM_TLS_VERIFY": value})
    assert settings.upstream_tls_verify is expected


def test_load_settings_ignores_relay_test_variables() -> None:
    """RELAY_TEST_* variables belong to the test suite and are not settings."""
    settings = load_settings(environ={"RELAY_TEST_REDIS_SERVER": "/usr/bin/redis-server"})
    assert settings.listen == Endpoint("127.0.0.1", 2525)


def test_load_settings_ignores_other_variables() -> None:
    """Variables without the RELAY_ prefix are not looked at."""
    settings = load_settings(environ={"PATH": "/usr/bin", "LISTEN": "garbage"})
    assert settings.listen == Endpoint("127.0.0.1", 2525)


# -- the TOML file -----------------------------------------------------------------------------
def test_load_settings_reads_toml_file(tmp_path: Path) -> None:
    """Keys of the TOML file (variable names without RELAY_) set the values, typed or text."""
    path = write_toml(tmp_path, """
listen = "[::1]:2600"
max_recipients = 40
idle_timeout = 9.5
allow_plaintext_auth = true
default_tz = "Pacific/Auckland"
upstream_url = "smtp+starttls://user:pw@mail.example.test"
""")
    settings = load_settings(environ={}, config_file=path)
    assert settings.listen == Endpoint("::1", 2600)
    assert settings.max_recipients == 40
    assert settings.idle_timeout == 9.5
    assert settings.allow_plaintext_auth is True
    assert settings.default_tz == "Pacific/Auckland"
    assert settings.upstream == UpstreamTarget("mail.example.test", 587, "starttls", "user", "pw")


def test_load_settings_environment_overrides_toml(tmp_path: Path) -> None:
    """A RELAY_* variable wins over the same key in the TOML file; other file keys stay."""
    path = write_toml(tmp_path, 'max_recipients = 40\nlog_level = "warning"\n')
    settings = load_settings(environ={"RELAY_MAX_RECIPIENTS": "7"}, config_file=path)
    assert settings.max_recipients == 7
    assert settings.log_level == "warning"


def test_load_settings_relay_config_names_the_file(tmp_path: Path) -> None:
    """RELAY_CONFIG points at the TOML file when no config_file is passed."""
    path = write_toml(tmp_path, "max_recipients = 41\n")
    settings = load_settings(environ={"RELAY_CONFIG": str(path)})
    assert settings.max_recipients == 41


def test_load_settings_unknown_toml_key_names_file_and_key(tmp_path: Path) -> None:
    """An unknown key in the TOML file is refused with the file and the key."""
    path = write_toml(tmp_path, "max_recipients = 40\nmax_recipents = 41\n")
    with pytest.raises(SettingsError) as info:
        load_settings(environ={}, config_file=path)
    assert str(path) in str(info.value)
    assert "max_recipents" in str(info.value)


def test_load_settings_toml_table_is_refused(tmp_path: Path) -> None:
    """A table where a single value belongs is refused with the file and the key."""
    path = write_toml(tmp_path, "[listen]\nhost = \"127.0.0.1\"\n")
    with pytest.raises(SettingsError) as info:
        load_settings(environ={}, config_file=path)
    assert str(path) in str(info.value) and "listen" in str(info.value)


def test_load_settings_bad_toml_value_names_file_and_key(tmp_path: Path) -> None:
    """A bad value in the TOML file is refused with the file and the key."""
    path = write_toml(tmp_path, "max_recipients = -3\n")
    with pytest.raises(SettingsError) as info:
        load_settings(environ={}, config_file=path)
    assert str(path) in str(info.value) and "max_recipients" in str(info.value)


def test_load_settings_invalid_toml_names_file(tmp_path: Path) -> None:
    """A TOML syntax error is a SettingsError naming the file."""
    path = write_toml(tmp_path, "listen = \n")
    with pytest.raises(SettingsError) as info:
        load_settings(environ={}, config_file=path)
    assert str(path) in str(info.value)


def test_load_settings_missing_toml_file_names_it(tmp_path: Path) -> None:
    """A config file that cannot be read is a SettingsError naming it."""
    path = tmp_path / "absent.toml"
    with pytest.raises(SettingsError) as info:
        load_settings(environ={}, config_file=path)
    assert str(path) in str(info.value)


# -- refusals ----------------------------------------------------------------------------------
def test_load_settings_unknown_variable_is_named() -> None:
    """An unknown RELAY_* variable (a typo) is refused, naming the variable."""
    with pytest.raises(SettingsError) as info:
        load_settings(environ={"RELAY_FOO": "1"})
    assert "RELAY_FOO" in str(info.value)


@pytest.mark.parametrize(("var", "value"), [
    ("RELAY_LISTEN", "127.0.0.1:70000"),
    ("RELAY_LISTEN", "127.0.0.1"),
    ("RELAY_LISTEN", "127.0.0.1:-1"),
    ("RELAY_LISTEN", "example.com:2525"),
    ("RELAY_LISTEN", "relay.invalid:25"),
    ("RELAY_SMTPS_LISTEN", "[::1]:65536"),
    ("RELAY_DEFAULT_TZ", "Mars/Olympus_Mons"),
    ("RELAY_DEFAULT_TZ", "../../etc/passwd"),
    ("RELAY_ALLOW_PLAINTEXT_AUTH", "maybe"),
    ("RELAY_UPSTREAM_TLS_VERIFY", "2"),
    ("RELAY_MAX_RECIPIENTS", "-5"),
    ("RELAY_MAX_RECIPIENTS", "0"),
    ("RELAY_MAX_RECIPIENTS", "ten"),
    ("RELAY_MAX_MESSAGE_SIZE", "-1"),
    ("RELAY_UPSTREAM_POOL_SIZE", "1.5"),
    ("RELAY_IDLE_TIMEOUT", "-0.5"),
    ("RELAY_UPSTREAM_TIMEOUT", "0"),
    ("RELAY_REDIS_TIMEOUT", "soon"),
    ("RELAY_LOG_FORMAT", "xml"),
    ("RELAY_LOG_LEVEL", "loud"),
    ("RELAY_HOSTNAME", "relay example"),
    ("RELAY_HOSTNAME", "relay\r\n.example"),
    ("RELAY_HOSTNAME", "rélay.example"),
    ("RELAY_DRAIN_TIMEOUT", "-1"),
    ("RELAY_DRAIN_TIMEOUT", "nan"),
    ("RELAY_DRAIN_TIMEOUT", "inf"),
    ("RELAY_WORKERS", "0"),
    ("RELAY_WORKERS", "many"),
    ("RELAY_EVENT_LOOP", "trio"),
])
def test_load_settings_bad_value_names_the_key(var: str, value: str) -> None:
    """A malformed value is a SettingsError naming the setting."""
    with pytest.raises(SettingsError) as info:
        load_settings(environ={var: value})
    assert var.removeprefix("RELAY_").lower() in str(info.value)


def test_load_settings_lifecycle_defaults_and_values() -> None:
    """Drain 30 s, one worker per core (None), the event loop chosen automatically; each
    can be set, a drain timeout of 0 cuts at once and "auto" spells the default."""
    default = load_settings(environ={})
    assert (default.drain_timeout, default.workers, default.event_loop) == (30.0, None, "auto")
    settings = load_settings(environ={"RELAY_DRAIN_TIMEOUT": "0", "RELAY_WORKERS": "4",
                                      "RELAY_EVENT_LOOP": "asyncio"})
    assert (settings.drain_timeout, settings.workers, settings.event_loop) == \
        (0.0, 4, "asyncio")
    assert load_settings(environ={"RELAY_WORKERS": "auto"}).workers is None
    assert load_settings(environ={"RELAY_EVENT_LOOP": "uvloop"}).event_loop == "uvloop"


def test_load_settings_lifecycle_from_toml(tmp_path: Path) -> None:
    """The TOML file takes the same keys, numbers as numbers."""
    path = write_toml(tmp_path, 'drain_timeout = 12.5\nworkers = 3\nevent_loop = "uvloop"\n')
    settings = load_settings(environ={}, config_file=path)
    assert (settings.drain_timeout, settings.workers, settings.event_loop) == \
        (12.5, 3, "uvloop")


def test_parse_endpoint_refuses_host_names_without_dns() -> None:
    """A host name (not an IP literal) is refused before any lookup could happen."""
    # "relay.invalid" can never resolve (RFC 2606); a lookup would not make it valid either.
    for value in ("example.com:25", "relay.invalid:25", "[example.com]:25"):
        with pytest.raises(SettingsError, match="IP address"):
            parse_endpoint(value)


@pytest.mark.parametrize("url", [
    f"smtp+starttls://user:{SECRET}@mail.example.test:99999",
    f"smtp+starttls://user:{SECRET}@mail.example.test:port",
    f"ftp://user:{SECRET}@mail.example.test",
    f"smtp://user:{SECRET}@[mail.example.test",
    f"smtp://:{SECRET}@mail.example.test",
])
def test_load_settings_bad_upstream_url_hides_secret(url: str) -> None:
    """The error for a bad upstream URL names the key and never echoes the password."""
    with pytest.raises(SettingsError) as info:
        load_settings(environ={"RELAY_UPSTREAM_URL": url})
    assert "upstream_url" in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


@pytest.mark.parametrize("url", [
    f"http://:{SECRET}@127.0.0.1:6379/0",
    f"redis://:{SECRET}@[127.0.0.1:6379/0",
    f"mysql://root:{SECRET}@127.0.0.1/0",
])
def test_load_settings_bad_redis_url_hides_secret(url: str) -> None:
    """The error for a bad Redis URL names the key and never echoes the password."""
    with pytest.raises(SettingsError) as info:
        load_settings(environ={"RELAY_REDIS_URL": url})
    assert "redis_url" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(("url", "problem"), [
    ("smtp//mail.example.test", "not a URL (no scheme:// at the start)"),
    ("http://mail.example.test", "scheme 'http' is not one of smtp, smtp+starttls, smtps"),
    ("mail.example.test:notaport", "not a URL (no scheme:// at the start)"),
    ("smtp://mail.example.test:notaport", "the port must be a number from 1 to 65535"),
    ("smtp://mail.example.test:0", "the port must be a number from 1 to 65535"),
    ("smtp://", "no host after scheme://"),
    (f"smtp+starttls://user:{SECRET}@mail.example.test:587/x", "nothing may follow host:port"),
    (f"smtp+starttls://:{SECRET}@mail.example.test", "needs both a user and a password"),
])
def test_load_settings_bad_upstream_url_says_what_is_wrong(url: str, problem: str) -> None:
    """A malformed RELAY_UPSTREAM_URL (or route URL) names what is wrong and shows a valid
    example, like every other setting, and still never repeats the URL or its password."""
    for var in ("RELAY_UPSTREAM_URL", "RELAY_ROUTE_MAILCHIMP_URL"):
        with pytest.raises(SettingsError) as info:
            load_settings(environ={var: url})
        text = str(info.value)
        assert problem in text, text
        assert "e.g. smtp+starttls://user:password@smtp.example.com:587" in text
        assert "invalid value" not in text
        assert SECRET not in text
        assert url not in text or url == "smtp://"  # (the example itself has "smtp://")


@pytest.mark.parametrize("var", ["RELAY_ADMIN_TOKEN", "RELAY_NOTIFY_WEBHOOK_SECRET"])
def test_load_settings_short_secret_says_how_long_without_repeating_it(var: str) -> None:
    """A secret that is too short is named with what is wrong (its length), never echoed."""
    with pytest.raises(SettingsError) as info:
        load_settings(environ={var: "short-secret"})
    assert "must be at least 16 characters (this one has 12)" in str(info.value)
    assert "short-secret" not in str(info.value)


def test_load_settings_bad_secret_in_toml_hides_it(tmp_path: Path) -> None:
    """A bad upstream URL in the TOML file is named by file and key, without the secret."""
    path = write_toml(tmp_path, f'upstream_url = "smtp://u:{SECRET}@mail.example.test:0x19"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(environ={}, config_file=path)
    assert str(path) in str(info.value) and "upstream_url" in str(info.value)
    assert SECRET not in str(info.value)


# -- cross-field checks ------------------------------------------------------------------------
@pytest.mark.parametrize("listen", ["0.0.0.0:2525", "[::]:2525", "192.0.2.10:2525"])
def test_load_settings_plaintext_auth_refused_off_loopback(listen: str) -> None:
    """allow_plaintext_auth is refused unless the plaintext listener is on loopback."""
    with pytest.raises(SettingsError) as info:
        load_settings(environ={"RELAY_LISTEN": listen, "RELAY_ALLOW_PLAINTEXT_AUTH": "1"})
    assert "allow_plaintext_auth" in str(info.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:2525", "[::1]:2525", "localhost:2525"])
def test_load_settings_plaintext_auth_allowed_on_loopback(listen: str) -> None:
    """allow_plaintext_auth is accepted on 127.0.0.1 and ::1."""
    settings = load_settings(environ={"RELAY_LISTEN": listen,
                                      "RELAY_ALLOW_PLAINTEXT_AUTH": "true"})
    assert settings.allow_plaintext_auth is True


def test_load_settings_public_listen_without_plaintext_auth_is_fine() -> None:
    """Listening on all addresses is allowed when AUTH needs TLS."""
    settings = load_settings(environ={"RELAY_LISTEN": "0.0.0.0:587"})
    assert settings.listen == Endpoint("0.0.0.0", 587)
    assert settings.allow_plaintext_auth is False


@pytest.mark.parametrize("var", ["RELAY_TLS_CERT", "RELAY_TLS_KEY"])
def test_load_settings_tls_cert_and_key_come_together(var: str) -> None:
    """tls_cert without tls_key (or the reverse) is refused, naming both."""
    with pytest.raises(SettingsError) as info:
        load_settings(environ={var: "/etc/relay/file.pem"})
    assert "tls_cert" in str(info.value) and "tls_key" in str(info.value)


# -- secrets are masked ------------------------------------------------------------------------
def test_settings_repr_masks_secrets() -> None:
    """repr(Settings) shows neither the Redis password nor the upstream password."""
    settings = load_settings(environ={
        "RELAY_REDIS_URL": f"redis://relay:{SECRET}@127.0.0.1:6379/0",
        "RELAY_UPSTREAM_URL": f"smtp+starttls://apikey:{SECRET}@mail.example.test:587",
    })
    assert settings.redis_url == f"redis://relay:{SECRET}@127.0.0.1:6379/0"
    assert settings.upstream is not None and settings.upstream.password == SECRET
    shown = repr(settings)
    assert SECRET not in shown
    assert "redis://relay:***@127.0.0.1:6379/0" in shown
    assert "mail.example.test" in shown


def test_settings_repr_masks_percent_encoded_redis_password() -> None:
    """A percent-encoded Redis password is masked in either spelling."""
    settings = load_settings(environ={"RELAY_REDIS_URL": "redis://:p%40ss%2Fword@127.0.0.1/0"})
    shown = repr(settings)
    assert "p%40ss" not in shown and "p@ss" not in shown
    assert "127.0.0.1" in shown


def test_settings_repr_masks_redis_password_in_query() -> None:
    """A password given as ?password=… (redis-py accepts it) is masked too."""
    settings = load_settings(environ={
        "RELAY_REDIS_URL": f"redis://127.0.0.1:6379/0?password={SECRET}&db=1"})
    shown = repr(settings)
    assert SECRET not in shown
    assert "db=1" in shown


def test_settings_repr_without_secrets_shows_url() -> None:
    """A Redis URL without a password is shown as it is."""
    settings = Settings(redis_url="redis://127.0.0.1:6379/0")
    assert "redis://127.0.0.1:6379/0" in repr(settings)


def test_upstream_target_str_and_repr_mask_password() -> None:
    """str() and repr() of an UpstreamTarget show the user but never the password."""
    target = parse_upstream_url(f"smtp+starttls://apikey:{SECRET}@mail.example.test")
    assert str(target) == "smtp+starttls://apikey:***@mail.example.test:587"
    assert SECRET not in repr(target)
    assert str(UpstreamTarget("::1", 465, "implicit")) == "smtps://[::1]:465"


# A valid value for every secret setting, each holding SECRET (the Fernet key is one).
FERNET_KEY = base64.urlsafe_b64encode(b"0123456789abcdef0123456789abcdef").decode()
SECRET_VALUES = {
    "RELAY_REDIS_URL": f"redis://relay:{SECRET}@127.0.0.1:6379/0",
    "RELAY_UPSTREAM_URL": f"smtp+starttls://apikey:{SECRET}@mail.example.test:587",
    "RELAY_NOTIFY_WEBHOOK_SECRET": f"{SECRET}-notify",
    "RELAY_ROUTE_<NAME>_URL": f"smtps://mc:{SECRET}@smtp.mandrill.example",
    "RELAY_CREDENTIALS_KEY": FERNET_KEY,
    "RELAY_TIMELINE_WEBHOOK_SECRET": f"{SECRET}-timeline",
    "RELAY_ADMIN_TOKEN": f"{SECRET}-admin",
    "RELAY_LINK_SECRET": f"{SECRET}-links",
    "RELAY_MANDRILL_WEBHOOK_KEY": f"{SECRET}-mandrill",
    "RELAY_MANDRILL_WEBHOOK_URL": f"https://relay:{SECRET}@relay.example.test/webhooks/mandrill",
    "RELAY_COMMAND_WEBHOOK_SECRET": f"{SECRET}-command",
}


def test_settings_repr_masks_every_secret_setting() -> None:
    """Every setting declared secret is masked in repr(Settings), whatever its kind: a URL
    keeps its host, a token or key shows as ***."""
    assert set(SECRET_VALUES) == {d.variable for d in SETTINGS if d.setting.secret}
    environ = {var.replace("<NAME>", "MAILCHIMP"): value
               for var, value in SECRET_VALUES.items()}
    environ.update(RELAY_NOTIFY_WEBHOOK_URL="https://crm.example.test/notify",
                   RELAY_TIMELINE_WEBHOOK_URL="https://crm.example.test/timeline")
    settings = load_settings(environ=environ)
    assert settings.admin_token == f"{SECRET}-admin"
    assert settings.route_urls["mailchimp"].password == SECRET
    shown = repr(settings)
    assert SECRET not in shown and FERNET_KEY not in shown
    assert "admin_token='***'" in shown and "credentials_key='***'" in shown
    assert "smtp.mandrill.example" in shown and "127.0.0.1:6379" in shown
    assert "notify_webhook_url='https://crm.example.test/notify'" in shown


def test_load_settings_route_url_from_file_and_environment(tmp_path: Path) -> None:
    """RELAY_ROUTE_<NAME>_URL (route_<name>_url in the file) sets one route's upstream per
    name; the environment wins, and an empty variable leaves the file's value."""
    path = write_toml(tmp_path, 'route_mailchimp_url = "smtps://mc:pw@smtp.file.example"\n'
                                'route_bulk_url = "smtp://127.0.0.1:2526"\n')
    settings = load_settings(environ={"RELAY_ROUTE_MAILCHIMP_URL": "smtp://127.0.0.1:2527",
                                      "RELAY_ROUTE_BULK_URL": ""}, config_file=path)
    assert settings.route_urls == {"mailchimp": UpstreamTarget("127.0.0.1", 2527, "none"),
                                   "bulk": UpstreamTarget("127.0.0.1", 2526, "none")}
    assert load_settings(environ={}).route_urls == {}


def test_load_settings_bad_route_url_names_its_key(tmp_path: Path) -> None:
    """A bad route URL is named by its own key, from the file or from the environment."""
    path = write_toml(tmp_path, 'route_mailchimp_url = "http://smtp.example.test"\n')
    with pytest.raises(SettingsError, match=rf"^{path}: route_mailchimp_url: scheme 'http'"):
        load_settings(environ={}, config_file=path)
    with pytest.raises(SettingsError,
                       match=r"^environment: route_bulk_url: not a URL \(no scheme"):
        load_settings(environ={"RELAY_ROUTE_BULK_URL": "127.0.0.1:25"})


# -- PROXY protocol and client protections ---------------------------------------------------
def test_load_settings_protection_defaults() -> None:
    """PROXY is off by default; the client protections are on with documented defaults."""
    settings = load_settings(environ={})
    assert settings.proxy_protocol is False
    assert settings.trusted_proxies == ()
    assert settings.proxy_protocol_timeout == 10.0
    assert (settings.max_connections, settings.max_connections_per_ip) == (1000, 200)
    assert (settings.auth_max_failures_per_ip, settings.auth_max_failures_per_login) == (30, 10)
    assert settings.auth_failure_window == 600.0
    assert settings.transaction_timeout == 600.0


def test_load_settings_parses_protection_variables() -> None:
    """Every PROXY and protection variable is read; trusted_proxies takes addresses and CIDR
    networks separated by commas and/or spaces; 0 turns a limit off."""
    settings = load_settings(environ={
        "RELAY_PROXY_PROTOCOL": "on",
        "RELAY_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7  2001:db8::/32",
        "RELAY_PROXY_PROTOCOL_TIMEOUT": "3.5",
        "RELAY_MAX_CONNECTIONS": "0",
        "RELAY_MAX_CONNECTIONS_PER_IP": "25",
        "RELAY_AUTH_MAX_FAILURES_PER_IP": "0",
        "RELAY_AUTH_MAX_FAILURES_PER_LOGIN": "4",
        "RELAY_AUTH_FAILURE_WINDOW": "900",
        "RELAY_TRANSACTION_TIMEOUT": "120",
    })
    assert settings.proxy_protocol is True
    assert [str(network) for network in settings.trusted_proxies] == \
        ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]
    assert settings.proxy_protocol_timeout == 3.5
    assert (settings.max_connections, settings.max_connections_per_ip) == (0, 25)
    assert (settings.auth_max_failures_per_ip, settings.auth_max_failures_per_login) == (0, 4)
    assert settings.auth_failure_window == 900.0
    assert settings.transaction_timeout == 120.0


def test_load_settings_protections_from_toml(tmp_path: Path) -> None:
    """The same keys work in the TOML file (trusted_proxies as one string)."""
    path = write_toml(tmp_path, 'proxy_protocol = true\ntrusted_proxies = "10.1.0.0/16"\n'
                                "max_connections_per_ip = 50\n")
    settings = load_settings(environ={}, config_file=path)
    assert settings.proxy_protocol is True
    assert [str(n) for n in settings.trusted_proxies] == ["10.1.0.0/16"]
    assert settings.max_connections_per_ip == 50


@pytest.mark.parametrize(("var", "value"), [
    ("RELAY_TRUSTED_PROXIES", "10.0.0.1/8"),  # host bits set: a typo for 10.0.0.0/8?
    ("RELAY_TRUSTED_PROXIES", "lb.internal"),
    ("RELAY_TRUSTED_PROXIES", "10.0.0.0/33"),
    ("RELAY_PROXY_PROTOCOL", "sometimes"),
    ("RELAY_PROXY_PROTOCOL_TIMEOUT", "0"),
    ("RELAY_MAX_CONNECTIONS", "-1"),
    ("RELAY_MAX_CONNECTIONS_PER_IP", "many"),
    ("RELAY_AUTH_MAX_FAILURES_PER_IP", "-3"),
    ("RELAY_AUTH_MAX_FAILURES_PER_LOGIN", "2.5"),
    ("RELAY_AUTH_FAILURE_WINDOW", "0"),
    ("RELAY_TRANSACTION_TIMEOUT", "-1"),
])
def test_load_settings_bad_protection_value_names_the_key(var: str, value: str) -> None:
    """A malformed PROXY or protection value is refused, naming the setting."""
    environ = {var: value}
    if var != "RELAY_PROXY_PROTOCOL":
        environ.setdefault("RELAY_PROXY_PROTOCOL", "1")
        environ.setdefault("RELAY_TRUSTED_PROXIES", "10.0.0.0/8")
    with pytest.raises(SettingsError) as info:
        load_settings(environ=environ)
    assert var.removeprefix("RELAY_").lower() in str(info.value)


@pytest.mark.parametrize(("environ", "named"), [
    ({"RELAY_PROXY_PROTOCOL": "1"}, "trusted_proxies"),
    ({"RELAY_TRUSTED_PROXIES": "10.0.0.0/8"}, "proxy_protocol"),
    ({"RELAY_PROXY_PROTOCOL": "1", "RELAY_TRUSTED_PROXIES": "10.0.0.0/8",
      "RELAY_SMTPS_LISTEN": "0.0.0.0:465"}, "smtps_listen"),
])
def test_load_settings_proxy_protocol_cross_checks(environ: dict[str, str], named: str) -> None:
    """PROXY needs trusted proxies (and the reverse), and cannot share a process with an
    implicit-TLS listener."""
    with pytest.raises(SettingsError) as info:
        load_settings(environ=environ)
    assert named in str(info.value)
# -- Redis topologies (redisconf.py) -----------------------------------------------------------
@pytest.mark.parametrize("url", [
    "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/relaymaster",
    "rediss+sentinel://10.0.0.1/relaymaster/1?ssl_ca_certs=/etc/ca.pem",
    "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
    "rediss+cluster://10.0.0.1:7000",
])
def test_load_settings_accepts_sentinel_and_cluster_urls(url: str) -> None:
    """Sentinel and Cluster URL forms are accepted as RELAY_REDIS_URL."""
    assert load_settings(environ={"RELAY_REDIS_URL": url}).redis_url == url


def test_load_settings_bad_sentinel_url_names_the_problem() -> None:
    """A Sentinel URL without its service name is refused, saying what is missing."""
    with pytest.raises(SettingsError, match=r"redis_url: .*service name"):
        load_settings(environ={"RELAY_REDIS_URL": f"redis+sentinel://:{SECRET}@127.0.0.1"})


def test_load_settings_redis_wait_replicas() -> None:
    """redis_wait_replicas: 0 by default, a count with a single server or Sentinel; refused
    with a Cluster URL, without RELAY_REDIS_URL, and when negative."""
    assert load_settings(environ={}).redis_wait_replicas == 0
    settings = load_settings(environ={"RELAY_REDIS_URL": "redis+sentinel://127.0.0.1/m",
                                      "RELAY_REDIS_WAIT_REPLICAS": "1"})
    assert settings.redis_wait_replicas == 1
    with pytest.raises(SettingsError, match="redis_wait_replicas: not supported with redis"):
        load_settings(environ={"RELAY_REDIS_URL": "redis+cluster://127.0.0.1:7000",
                               "RELAY_REDIS_WAIT_REPLICAS": "1"})
    with pytest.raises(SettingsError, match="redis_wait_replicas: the embedded"):
        load_settings(environ={"RELAY_REDIS_WAIT_REPLICAS": "1"})
    with pytest.raises(SettingsError, match="redis_wait_replicas"):
        load_settings(environ={"RELAY_REDIS_URL": "redis://127.0.0.1/0",
                               "RELAY_REDIS_WAIT_REPLICAS": "-1"})


def test_settings_repr_masks_sentinel_passwords() -> None:
    """The master's and the sentinels' passwords are both masked in a Sentinel URL."""
    settings = load_settings(environ={"RELAY_REDIS_URL": (
        f"redis+sentinel://relay:{SECRET}@127.0.0.1:26379,127.0.0.1:26380/m"
        f"?sentinel_password={SECRET}")})
    shown = repr(settings)
    assert SECRET not in shown
    assert "127.0.0.1:26380/m" in shown and "sentinel_password=***" in shown
# -- the metrics listeners -----------------------------------------------------------------------
def test_load_settings_metrics_listeners_default_to_loopback() -> None:
    """/metrics, /healthz and /readyz listen on loopback by default: 9465 (serve) and 9466
    (the notifier)."""
    settings = load_settings(environ={})
    assert settings.metrics_listen == Endpoint("127.0.0.1", 9465)
    assert settings.notifier_metrics_listen == Endpoint("127.0.0.1", 9466)


def test_load_settings_metrics_listeners_set_and_turned_off(tmp_path: Path) -> None:
    """An address moves a metrics listener; an empty value (variable or TOML) turns it off."""
    settings = load_settings(environ={"RELAY_METRICS_LISTEN": "0.0.0.0:9100",
                                      "RELAY_NOTIFIER_METRICS_LISTEN": ""})
    assert settings.metrics_listen == Endpoint("0.0.0.0", 9100)
    assert settings.notifier_metrics_listen is None
    path = tmp_path / "relay.toml"
    path.write_text('metrics_listen = ""\nnotifier_metrics_listen = "[::1]:9466"\n')
    settings = load_settings(environ={}, config_file=path)
    assert settings.metrics_listen is None
    assert settings.notifier_metrics_listen == Endpoint("::1", 9466)


def test_load_settings_metrics_listen_needs_an_ip_literal() -> None:
    """A host name (a DNS lookup) is refused, naming the key."""
    with pytest.raises(SettingsError, match="metrics_listen: listen host must be an IP"):
        load_settings(environ={"RELAY_METRICS_LISTEN": "metrics.example:9465"})
