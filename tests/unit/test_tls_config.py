"""`server.tls` and `ensemble replica --tls-*`: paths relative to the config file; missing,
unreadable, non-PEM, encrypted or mismatched files are config errors naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from ensemble.cli import main
from ensemble.config import load_config
from ensemble.errors import ConfigError

CONFIG = """
server:
  tls: {TLS}
ensembles:
  - name: e
    members:
      - {name: a, model: a.onnx, placement: [{tier: edge}]}
"""


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """tmp_path/certs: ca.pem, server.pem + server.key, other.key (another key), junk.pem."""
    directory = tmp_path / "certs"
    directory.mkdir()
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "server.key"))
    ca.issue_cert("other").private_key_pem.write_to_path(str(directory / "other.key"))
    (directory / "junk.pem").write_text("not a certificate\n")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (directory / "encrypted.key").write_bytes(encrypted)
    return directory


def write(tmp_path: Path, tls: str) -> Path:
    (tmp_path / "a.onnx").write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.replace("{TLS}", tls))
    return path


def only_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [error] = info.value.errors
    return error


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path, certs: Path) -> None:
    tls = "{cert_file: certs/server.pem, key_file: certs/server.key, client_ca_file: certs/ca.pem}"
    cfg = load_config(write(tmp_path, tls))
    assert cfg.server.tls is not None
    resolved = cfg.server.tls.resolved(cfg.base_dir)
    assert resolved.cert_file == certs / "server.pem"
    assert resolved.key_file == certs / "server.key"
    assert resolved.client_ca_file == certs / "ca.pem"


@pytest.mark.parametrize(
    ("tls", "where", "why"),
    [
        ("{cert_file: certs/absent.pem, key_file: certs/server.key}", "cert_file", "cannot read"),
        ("{cert_file: certs, key_file: certs/server.key}", "cert_file", "cannot read"),
        ("{cert_file: certs/junk.pem, key_file: certs/server.key}", "cert_file", "no PEM cert"),
        ("{cert_file: certs/server.pem, key_file: certs/absent.key}", "key_file", "cannot read"),
        ("{cert_file: certs/server.pem, key_file: certs/junk.pem}", "key_file", "no PEM private"),
        (
            "{cert_file: certs/server.pem, key_file: certs/other.key}",
            "key_file",
            "is not the private key of the certificate in",
        ),
        (
            "{cert_file: certs/server.pem, key_file: certs/encrypted.key}",
            "key_file",
            "is encrypted",
        ),
        (
            "{cert_file: certs/server.pem, key_file: certs/server.key, client_ca_file: nope.pem}",
            "client_ca_file",
            "cannot read",
        ),
        (
            "{cert_file: certs/server.pem, key_file: certs/server.key, "
            "client_ca_file: certs/junk.pem}",
            "client_ca_file",
            "holds no usable CA certificate",
        ),
    ],
)
def test_bad_files_are_config_errors(
    tmp_path: Path, certs: Path, tls: str, where: str, why: str
) -> None:
    error = only_error(write(tmp_path, tls))
    assert f"server.tls.{where}" in error and why in error, error
    assert "c.yaml:3:" in error  # located at the `tls:` line


def test_a_bad_key_and_a_bad_ca_are_reported_together(tmp_path: Path, certs: Path) -> None:
    tls = "{cert_file: certs/server.pem, key_file: certs/other.key, client_ca_file: nope.pem}"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, tls))
    assert [e.split(": ")[1] for e in info.value.errors] == [
        "server.tls.key_file",
        "server.tls.client_ca_file",
    ]


def test_a_key_without_a_certificate_is_a_schema_error(tmp_path: Path, certs: Path) -> None:
    error = only_error(write(tmp_path, "{key_file: certs/server.key}"))
    assert "server.tls.cert_file" in error


def test_replica_flags_are_checked_before_anything_loads(
    certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(certs / "absent.onnx")  # never opened: the flags fail first
    assert main(["replica", model, "--tls-key", str(certs / "server.key")]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    flags = ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "other.key")]
    assert main(["replica", model, *flags]) == 2
    assert "--tls-key:" in capsys.readouterr().err
    flags[-1] = str(certs / "server.key")
    assert main(["replica", model, *flags, "--tls-client-ca", str(certs / "junk.pem")]) == 2
    assert "--tls-client-ca:" in capsys.readouterr().err
