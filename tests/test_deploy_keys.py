"""`ark keys`: permissions, subject alternative names, the chain, and keys Flower accepts."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.supernode.register import try_load_public_key

from ark_core.fed import pki as K


def _ark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ark_core.commands.cli", "keys", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    res = _ark("init", str(d), "--server-name", "ark.example.org", "--server-name", "10.1.2.3",
               "--site", "site-a", "--site", "site-b")
    assert res.returncode == 0, res.stderr
    return d


def _sans(path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {
        str(i) for i in san.get_values_for_type(x509.IPAddress)}


def test_private_keys_are_0600_and_public_files_are_not_secret(keys_dir):
    for f in ["ca.key", "server.key", "sites/site-a.key", "sites/site-b.key"]:
        assert stat.S_IMODE((keys_dir / f).stat().st_mode) == 0o600, f
    for f in ["ca.crt", "server.crt", "sites/site-a.pub"]:
        assert stat.S_IMODE((keys_dir / f).stat().st_mode) & 0o077 != 0o077


def test_server_certificate_names_and_chain(keys_dir):
    dns, ips = _sans(keys_dir / "server.crt")
    assert dns == {"ark.example.org", "localhost"}
    assert ips == {"10.1.2.3", "127.0.0.1"}
    assert all(ipaddress.ip_address(i) for i in ips)
    cert = K.verify_server_cert(keys_dir)
    ca = x509.load_pem_x509_certificate((keys_dir / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # A certificate from another CA must not verify against this one.
    other = keys_dir.parent / "other"
    K.make_ca(other)
    (other / "server.crt").write_bytes((keys_dir / "server.crt").read_bytes())
    with pytest.raises(ValueError, match="not signed by"):
        K.verify_server_cert(other)


def test_site_keys_are_what_flower_loads(keys_dir):
    priv = load_ssh_private_key((keys_dir / "sites/site-a.key").read_bytes(), None)
    pub = load_ssh_public_key((keys_dir / "sites/site-a.pub").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert priv.public_key().public_numbers() == pub.public_numbers()
    # flwr supernode register's own loader accepts it.
    assert try_load_public_key(keys_dir / "sites/site-a.pub")


def test_add_rotate_remove_and_renew(keys_dir):
    res = _ark("add-site", str(keys_dir), "site-c")
    assert res.returncode == 0, res.stderr
    assert _ark("add-site", str(keys_dir), "site-c").returncode != 0  # never overwrites

    before = (keys_dir / "sites/site-c.pub").read_bytes()
    assert _ark("rotate-site", str(keys_dir), "site-c").returncode == 0
    after = (keys_dir / "sites/site-c.pub").read_bytes()
    assert before != after
    assert before in [p.read_bytes() for p in (keys_dir / "retired").glob("site-c-*.pub")]
    assert stat.S_IMODE((keys_dir / "sites/site-c.key").stat().st_mode) == 0o600

    assert _ark("remove-site", str(keys_dir), "site-c").returncode == 0
    assert not (keys_dir / "sites/site-c.key").exists()
    assert K.site_names(keys_dir) == ["site-a", "site-b"]

    old_serial = K.verify_server_cert(keys_dir).serial_number
    res = _ark("renew-server", str(keys_dir))  # far from expiry: nothing to do
    assert res.returncode == 0 and "nothing to do" in res.stdout
    assert K.verify_server_cert(keys_dir).serial_number == old_serial
    res = _ark("renew-server", str(keys_dir), "--force", "--server-name", "ark2.example.org")
    assert res.returncode == 0, res.stderr
    assert K.verify_server_cert(keys_dir).serial_number != old_serial
    dns, ips = _sans(keys_dir / "server.crt")
    assert dns == {"ark.example.org", "ark2.example.org", "localhost"}
    assert ips == {"10.1.2.3", "127.0.0.1"}


def test_bad_site_name_is_refused(tmp_path):
    K.make_ca(tmp_path)
    with pytest.raises(ValueError, match="site name"):
        K.make_site_key(tmp_path, "../evil")
