"""The federation's keys: its CA, the server certificate and the sites' key pairs.

Layout of a keys directory (what goes where is in deploy/README.md)::

    ca.crt  ca.key              the CA (ca.key never leaves the coordinator; keep it offline)
    server.crt  server.key      the SuperLink's TLS certificate, signed by the CA
    sites/<site>.key            a site's ECDSA P-384 private key (OpenSSH format; to that site only)
    sites/<site>.pub            its public key (OpenSSH format; the coordinator registers it)
    retired/                    keys replaced by ``rotate-site`` or dropped by ``remove-site``

Private keys are written 0600. Flower reads site keys with ``load_ssh_private_key`` /
``load_ssh_public_key`` and accepts only NIST curves, hence P-384 in OpenSSH encoding.
Nothing here talks to a SuperLink: ``ark-server --sync-keys`` registers new public keys and
unregisters retired ones on a running server. ``ark keys`` (:mod:`ark_core.commands.keys`)
is the command line over these functions.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..io import atomic_write_bytes

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
CA_DAYS = 3650
SERVER_DAYS = 397  # the longest lifetime browsers and most TLS stacks still accept
RENEW_WITHIN_DAYS = 30
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


# ----------------------------------------------------------------------------- writing
def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ----------------------------------------------------------------------------- CA / server
def make_ca(keys_dir: Path, name: str = "Ark federation CA", days: int = CA_DAYS) -> None:
    """Create ``ca.key`` and a self-signed ``ca.crt``."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now_utc() - dt.timedelta(minutes=5))
        .not_valid_after(now_utc() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    atomic_write_bytes(keys_dir / "ca.key", _pem_key(key), private=True)
    atomic_write_bytes(keys_dir / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(keys_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((keys_dir / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((keys_dir / "ca.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{keys_dir / 'ca.key'}: not an EC private key")
    return cert, key


def server_names(dns: list[str], ips: list[str]) -> list[x509.GeneralName]:
    """Subject alternative names; an entry that parses as an IP address becomes an IP SAN.

    ``localhost`` and ``127.0.0.1`` are always added: the coordinator's own processes (the
    ServerApp, ``flwr run``, key registration) reach the SuperLink over loopback with TLS.
    """
    names: list[x509.GeneralName] = []
    for entry in [*dns, *ips, *LOOPBACK_NAMES]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            names.append(x509.DNSName(entry))
    unique: list[x509.GeneralName] = []
    for n in names:
        if n not in unique:
            unique.append(n)
    return unique


def make_server_cert(keys_dir: Path, names: list[x509.GeneralName], days: int = SERVER_DAYS) -> None:
    """Create (or replace) ``server.key`` and ``server.crt`` signed by the CA."""
    ca_cert, ca_key = _load_ca(keys_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    first = names[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now_utc() - dt.timedelta(minutes=5))
        .not_valid_after(min(now_utc() + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    atomic_write_bytes(keys_dir / "server.key", _pem_key(key), private=True)
    atomic_write_bytes(keys_dir / "server.crt", cert.public_bytes(serialization.Encoding.PEM))


def server_cert_names(keys_dir: Path) -> list[x509.GeneralName]:
    cert = x509.load_pem_x509_certificate((keys_dir / "server.crt").read_bytes())
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def verify_server_cert(keys_dir: Path, check_time: bool = True) -> x509.Certificate:
    """Check that ``server.crt`` is signed by ``ca.crt`` (and valid now); return it."""
    ca = x509.load_pem_x509_certificate((keys_dir / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((keys_dir / "server.crt").read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError(f"{keys_dir / 'server.crt'} is not signed by {keys_dir / 'ca.crt'}") from None
    if not check_time:
        return cert
    now = now_utc()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(f"{keys_dir / 'server.crt'}: expired or not yet valid")
    return cert


# ----------------------------------------------------------------------------- sites
def check_site_name(name: str) -> str:
    if not SITE_NAME.match(name):
        raise ValueError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (max 63)")
    return name


def make_site_key(keys_dir: Path, site: str) -> Path:
    """Create ``sites/<site>.key`` (0600) and ``sites/<site>.pub``; return the public key path."""
    check_site_name(site)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    sites = keys_dir / "sites"
    atomic_write_bytes(sites / f"{site}.key", priv, private=True)
    atomic_write_bytes(sites / f"{site}.pub", pub + f" {site}\n".encode())
    return sites / f"{site}.pub"


def retire_site_key(keys_dir: Path, site: str) -> Path:
    """Move a site's key pair to ``retired/<site>-<UTC time>.*``; return the folder."""
    sites = keys_dir / "sites"
    if not (sites / f"{site}.pub").exists():
        raise FileNotFoundError(f"{sites / (site + '.pub')}: no such site key")
    stamp = now_utc().strftime("%Y%m%dT%H%M%SZ")
    retired = keys_dir / "retired"
    retired.mkdir(exist_ok=True)
    for ext in ("pub", "key"):
        src = sites / f"{site}.{ext}"
        if src.exists():
            shutil.move(src, retired / f"{site}-{stamp}.{ext}")
    return retired


def site_names(keys_dir: Path) -> list[str]:
    return sorted(p.stem for p in (keys_dir / "sites").glob("*.pub"))


# ----------------------------------------------------------------------------- command
