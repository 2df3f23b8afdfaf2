"""Mutual TLS for the gRPC links: a cluster CA and node certificates (`tpi-node certs`).

Every node holds the CA certificate and its own key pair signed by that CA; the master requires a
client certificate (require_client_auth=True), so only holders of a cluster certificate can even
open a connection. Workers check the master's certificate against the name MASTER_NAME (set as
the TLS target name), which only the master's certificate carries: a worker's certificate cannot
impersonate the master, and the master may be reached by any address discovery found.

Layout of a certs folder made by `tpi-node certs --out DIR`:
    ca.crt ca.key           the cluster CA (keep ca.key off the nodes; needed only to add nodes)
    master.crt master.key   the master's certificate
    <name>.crt <name>.key   one per worker name given (default: "worker")
Keys are ECDSA P-256, files mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from tpi_node.errors import UserError

MASTER_NAME = "tpi-master"  # SAN every master certificate carries; workers check it
CA_DAYS, NODE_DAYS = 3650, 825


def _ec():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tpi-node cluster"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def make_ca(out: Path, cluster: str = "default") -> None:
    """Create out/ca.crt and out/ca.key (a self-signed CA for one cluster)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = _ec()
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(f"tpi-node CA ({cluster})")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "ca.key", _pem_key(key), private=True)
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_node_cert(out: Path, name: str, master: bool, hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Create out/<name>.crt/.key signed by out/ca.*. A master's certificate carries MASTER_NAME;
    every certificate carries its name, localhost and any `hosts` (DNS names or IPs) as SANs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the cluster CA in {out} ({e}); run `tpi-node certs --out {out}` first") from None
    key = _ec()
    now = dt.datetime.now(dt.timezone.utc)
    sans: list = [x509.DNSName(name), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if master:
        sans.insert(0, x509.DNSName(MASTER_NAME))
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=NODE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt, kf = out / f"{name}.crt", out / f"{name}.key"
    _write(kf, _pem_key(key), private=True)
    _write(crt, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return crt, kf


def make_cluster_certs(
    out: Path, workers: tuple[str, ...] = ("worker",), hosts: tuple[str, ...] = (), cluster: str = "default"
) -> list[Path]:
    """CA (kept when out/ca.* exist, so nodes can be added later), master and worker certs."""
    for w in workers:
        if not w or w in ("ca", "master") or not all(c.isalnum() or c in "-_." for c in w):
            raise UserError(f"bad worker certificate name '{w}' (letters, digits, - _ .; not ca/master)")
    made = []
    if not (out / "ca.crt").exists():
        make_ca(out, cluster)
        made.append(out / "ca.crt")
    if not (out / "master.crt").exists():
        made += make_node_cert(out, "master", master=True, hosts=hosts)
    for w in workers:
        made += make_node_cert(out, w, master=False, hosts=hosts)
    return made


def verify_chain(ca_pem: bytes, cert_pem: bytes) -> None:
    """Raise ValueError/InvalidSignature unless cert was signed by the CA and is valid now."""
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca)
    now = dt.datetime.now(dt.timezone.utc)
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise ValueError("certificate expired or not yet valid")


# ---------------------------------------------------------------- gRPC credentials


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read TLS file: {e.filename}: {e.strerror}") from None


def tls_files(
    role: str,
    cert: str | None = None,
    key: str | None = None,
    ca: str | None = None,
    certs_dir: str | None = None,
    name: str | None = None,
) -> TlsFiles | None:
    """The TLS files from --tls-cert/--tls-key/--tls-ca or a certs folder (--certs DIR: ca.crt and
    master.* for the master, <name>.* or worker.* for a worker); None when TLS is not asked for."""
    if certs_dir:
        d = Path(certs_dir).expanduser()
        stem = "master" if role == "master" else (name if name and (d / f"{name}.crt").exists() else "worker")
        cert, key, ca = cert or str(d / f"{stem}.crt"), key or str(d / f"{stem}.key"), ca or str(d / "ca.crt")
    given = [x for x in (cert, key, ca) if x]
    if not given:
        return None
    if len(given) != 3:
        raise UserError("TLS needs all three of --tls-cert, --tls-key and --tls-ca (or --certs DIR)")
    files = TlsFiles(Path(cert).expanduser(), Path(key).expanduser(), Path(ca).expanduser())
    for p in (files.cert, files.key, files.ca):
        if not p.is_file():
            raise UserError(f"TLS file not found: {p}")
    return files


def server_credentials(files: TlsFiles):
    """gRPC server credentials that require a client certificate signed by the cluster CA."""
    import grpc

    cert, key, ca = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(files: TlsFiles):
    """gRPC channel credentials presenting this node's certificate; pair with TLS_CHANNEL_OPTIONS."""
    import grpc

    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# The master is checked by its certificate name, not by the address the worker dialled.
TLS_CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", MASTER_NAME)]
