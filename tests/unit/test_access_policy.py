"""The public-port policy, without a server: what counts as loopback, what exposure needs, the token file."""

import pathlib

import pytest
from mpsd.config import ConfigError, PublicAccess, parse_config
from mpsd.supervisor.edge.access import (
    AccessError,
    AccessRule,
    bearer_of,
    exposure_problem,
    is_loopback,
    read_token,
    token_matches,
)

SECURED = PublicAccess(pathlib.Path("c.pem"), pathlib.Path("k.pem"), pathlib.Path("token"))


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("localhost", True), ("[::1]", True), ("::1", True),
    ("0.0.0.0", False), ("[::]", False), ("192.168.1.4", False), ("my-mac.local", False), ("localhost.evil.com", False),
])
def test_only_literal_loopback_counts(host, loopback):
    assert is_loopback(host) is loopback


def test_exposure_needs_tls_and_a_token_only_beyond_loopback():
    assert exposure_problem("127.0.0.1:7700", PublicAccess()) == ""
    assert exposure_problem("0.0.0.0:7700", SECURED) == ""
    assert "tls_cert and tls_key and token_file must be set" in exposure_problem("0.0.0.0:7700", PublicAccess())
    assert "token_file must be set" in exposure_problem("[::]:7700", PublicAccess(SECURED.tls_cert, SECURED.tls_key))


def test_metrics_listen_beyond_loopback_is_held_to_the_same_rule_and_says_why():
    """It served plain HTTP to anyone before the one HTTP edge: the refusal says what changed and what to set."""
    assert exposure_problem("0.0.0.0:9100", SECURED, "metrics_listen") == ""
    problem = exposure_problem("0.0.0.0:9100", PublicAccess(), "metrics_listen")
    assert problem.startswith("metrics_listen '0.0.0.0:9100' is not loopback")
    assert "tls_cert and tls_key and token_file must be set" in problem
    assert "/metrics is now served by the HTTP edge under the API's rule" in problem and "credentials_file" in problem


def test_the_rule_admits_anyone_without_a_token_and_only_its_holders_with_one():
    assert AccessRule(None).admits(()) and AccessRule(None).admits([("authorization", "Bearer anything")])
    rule = AccessRule(b"abc")
    assert rule.admits([("authorization", "Bearer abc")]) and rule.admits({"authorization": "bearer abc"}.items())
    assert not rule.admits(()) and not rule.admits([("authorization", "Bearer abd")])


def test_the_token_file_must_be_private_and_the_token_long(tmp_path):
    token = tmp_path / "token"
    token.write_text("  correct-horse-battery-staple\n")
    token.chmod(0o600)
    assert read_token(token) == b"correct-horse-battery-staple"
    token.chmod(0o640)
    with pytest.raises(AccessError, match="open to other users"):
        read_token(token)
    token.chmod(0o600)
    token.write_text("short")
    with pytest.raises(AccessError, match="at least 16 characters"):
        read_token(token)
    with pytest.raises(AccessError, match="No such file"):
        read_token(tmp_path / "missing")


def test_bearer_parsing_and_comparison():
    assert bearer_of((("x-other", "1"), ("authorization", "Bearer abc"))) == "abc"
    assert bearer_of((("authorization", "bearer abc"),)) == "abc"
    assert bearer_of((("authorization", "Basic abc"),)) == ""
    assert bearer_of(None) == ""
    assert token_matches("abc", b"abc") and not token_matches("abd", b"abc") and not token_matches("", b"abc")


MODEL = '[[models]]\nname = "demo"\nbackend = "torch-lm"\npath = "@demo"\n'


def test_tls_cert_and_key_go_together(tmp_path):
    config = parse_config('[daemon]\ntls_cert = "c.pem"\ntls_key = "k.pem"\ntoken_file = "t"\n' + MODEL,
                          source="x.toml", base_dir=tmp_path)
    assert config.daemon.access == PublicAccess(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "t")
    with pytest.raises(ConfigError, match="daemon.tls_key: tls_cert and tls_key go together"):
        parse_config('[daemon]\ntls_cert = "c.pem"\n' + MODEL, source="x.toml", base_dir=tmp_path)
