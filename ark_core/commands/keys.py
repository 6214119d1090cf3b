"""``ark keys``: make and manage the federation's keys (:mod:`ark_core.fed.pki` does the work)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from ..config import ConfigError, load_yaml, parse_config
from ..fed.deployment import ServerDeployment
from ..fed.pki import (
    RENEW_WITHIN_DAYS,
    SERVER_DAYS,
    make_ca,
    make_server_cert,
    make_site_key,
    now_utc,
    retire_site_key,
    server_cert_names,
    server_names,
    site_names,
    verify_server_cert,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("init", help="make the CA, the server certificate and site key pairs")
    p.add_argument("keys_dir", type=Path)
    p.add_argument("--config", type=Path, metavar="FEDERATION_YAML",
                   help="also take server names and site names from its deployment: section")
    p.add_argument("--server-name", action="append", default=[], metavar="DNS_OR_IP",
                   help="an address the sites use for the server (repeat; DNS names and IPs)")
    p.add_argument("--site", action="append", default=[], metavar="NAME", help="repeatable")
    p.add_argument("--days", type=int, default=SERVER_DAYS, help="server certificate lifetime")
    for name, help_ in [
        ("add-site", "make a key pair for a new site"),
        ("remove-site", "retire a site's key pair (then run ark-server --sync-keys)"),
        ("rotate-site", "replace a site's key pair (then run ark-server --sync-keys)"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("keys_dir", type=Path)
        p.add_argument("site")
    p = sub.add_parser("renew-server", help="new server certificate from the same CA and names")
    p.add_argument("keys_dir", type=Path)
    p.add_argument("--server-name", action="append", default=[], metavar="DNS_OR_IP",
                   help="add names to the existing ones")
    p.add_argument("--days", type=int, default=SERVER_DAYS)
    p.add_argument("--force", action="store_true", help="renew even if not close to expiry")
    p = sub.add_parser("show", help="list sites and the server certificate's names and expiry")
    p.add_argument("keys_dir", type=Path)


def _deployment_of(path: Path) -> ServerDeployment:
    data, text = load_yaml(path)
    if not isinstance(data, dict) or "deployment" not in data:
        raise ConfigError(f"{path}: no deployment: section")
    return parse_config(data["deployment"], ServerDeployment, source=f"{path} (deployment)")


def _show(keys_dir: Path) -> None:
    cert = verify_server_cert(keys_dir)
    names = ", ".join(str(n.value) for n in server_cert_names(keys_dir))
    left = (cert.not_valid_after_utc - now_utc()).days
    print(f"server certificate: {names}; expires {cert.not_valid_after_utc:%Y-%m-%d} ({left} days)")
    if left < RENEW_WITHIN_DAYS:
        print(f"  renew it now: ark keys renew-server {keys_dir}")
    print(f"sites: {', '.join(site_names(keys_dir)) or '(none)'}")


def run(args: argparse.Namespace) -> int:
    keys_dir: Path = args.keys_dir
    if args.action == "init":
        if args.config is not None:
            dep = _deployment_of(args.config)
            args.server_name = [*dep.server_names, *args.server_name]
            args.site = [*(s.name for s in dep.sites), *args.site]
        if not args.server_name:
            raise ValueError("give at least one --server-name (the address sites connect to)")
        if (keys_dir / "ca.key").exists():
            print(f"{keys_dir}: CA exists, keeping it")
        else:
            make_ca(keys_dir)
        if not (keys_dir / "server.crt").exists():
            make_server_cert(keys_dir, server_names(args.server_name, []), days=args.days)
        for site in args.site:
            if not (keys_dir / "sites" / f"{site}.pub").exists():
                make_site_key(keys_dir, site)
        _show(keys_dir)
    elif args.action == "add-site":
        if (keys_dir / "sites" / f"{args.site}.pub").exists():
            raise ValueError(f"site {args.site!r} already has a key; use rotate-site to replace it")
        print(f"wrote {make_site_key(keys_dir, args.site)} and its private key (send it to the site)")
    elif args.action == "remove-site":
        retire_site_key(keys_dir, args.site)
        print(f"retired {args.site}'s key; remove the site from the federation YAML and run "
              "ark-server --sync-keys to unregister it")
    elif args.action == "rotate-site":
        retire_site_key(keys_dir, args.site)
        print(f"wrote {make_site_key(keys_dir, args.site)}; run ark-server --sync-keys, then restart "
              "the site's ark-client with the new private key")
    elif args.action == "renew-server":
        cert = verify_server_cert(keys_dir, check_time=False)
        if not args.force and cert.not_valid_after_utc - now_utc() > dt.timedelta(RENEW_WITHIN_DAYS):
            print(f"server certificate valid until {cert.not_valid_after_utc:%Y-%m-%d}; "
                  "nothing to do (--force renews anyway)")
            return 0
        names = server_cert_names(keys_dir)
        names += [n for n in server_names(args.server_name, []) if n not in names]
        make_server_cert(keys_dir, names, days=args.days)
        print("renewed; restart ark-server on the same run directory (the run resumes)")
        _show(keys_dir)
    else:
        _show(keys_dir)
    return 0
