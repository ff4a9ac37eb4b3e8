"""Remote reading over HTTPS: the site certificate, and nginx as a TLS reverse proxy in front of the web UI.

``appliance https setup`` makes a site CA (ECDSA P-256, 10 years) and a server certificate for the box's
names and addresses (825 days) signed by it, or takes the admin's own certificate and key after checking
them; then it renders an nginx configuration (TLS 1.2 and 1.3 only, HSTS, plain HTTP answering only with a
301 to https) and the systemd unit that runs it. The web UI stays on 127.0.0.1 behind it
(``web_behind_proxy``). Files live under ``keys/https/`` of the data directory, private keys 0600.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import socket
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.durable import durable_rename
from appliance.errors import Refused
from appliance.store.datadir import DataDirectory

CA_DAYS = 3650  # the certificate radiologists trust once: ten years
SERVER_DAYS = 825  # the longest validity browsers accept for a server certificate
RENEW_WITHIN_DAYS = 60  # `https setup` issues a new server certificate this close to expiry (or on new names)
HSTS = "max-age=31536000"
SYSTEM_CONFIG = Path("/etc/appliance/nginx-https.conf")
SYSTEM_UNIT = Path("/etc/systemd/system/appliance-https.service")
UNIT_NAME = "appliance-https.service"
NGINX = Path("/usr/sbin/nginx")
PROXY_STATE = Path("/var/lib/appliance-https")  # nginx's prefix: logs, pid, request bodies being spooled
# Mozilla's "intermediate" profile: forward secrecy and AEAD only; TLS 1.3 suites are nginx's defaults
CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
           "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")


class CertificateRefused(Refused, ValueError):
    """The admin's certificate or key cannot serve the UI; ``reason_code`` says why."""


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """Where the certificates and keys of one data directory live (``keys/https/``)."""

    folder: Path

    @classmethod
    def of(cls, home: Path) -> TLSFiles:
        return cls(DataDirectory(home).keys / "https")

    @property
    def ca_certificate(self) -> Path:
        return self.folder / "site-ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "site-ca.key"

    @property
    def certificate(self) -> Path:
        """The server certificate, followed by its chain (what nginx's ssl_certificate takes)."""
        return self.folder / "server.pem"

    @property
    def key(self) -> Path:
        return self.folder / "server.key"


@dataclasses.dataclass(frozen=True)
class ServerCertificate:
    """What ``setup`` put in place: the certificate's subject names, expiry and who issued it."""

    names: tuple[str, ...]
    not_after: datetime.datetime
    issuer: str
    site_ca: bool  # made by the site CA here (else the admin's own)
    issued: bool  # a new certificate was written by this call


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` durably (temporary name, fsync, rename) with ``mode`` from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, mode)  # whatever the umask took away
    durable_rename(tmp, path)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(path, data, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def default_names() -> list[str]:
    """This box's host name (short and fully qualified), its non-loopback addresses, localhost and 127.0.0.1."""
    host = socket.gethostname()
    names = [host, socket.getfqdn(host), "localhost", "127.0.0.1"]
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        infos = []
    names += [str(info[4][0]) for info in infos if not ipaddress.ip_address(info[4][0]).is_loopback]
    return list(dict.fromkeys(n for n in names if n))


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_site_ca(site_name: str, now: datetime.datetime | None = None
                 ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA of this site only (ECDSA P-256, :data:`CA_DAYS`), allowed to sign server certificates and no CA."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, site_name or "CT screening appliance"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{site_name or 'Site'} appliance CA")])
    public = key.public_key()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue_server_certificate(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str],
                             now: datetime.datetime | None = None
                             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate for ``names`` (host names or IP addresses), :data:`SERVER_DAYS` long, signed by ``ca``."""
    if not names:
        raise CertificateRefused("NO_NAMES", "a server certificate needs at least one host name or address")
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.subject).public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=SERVER_DAYS), ca.not_valid_after_utc))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _site_ca(files: TLSFiles, site_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The site CA of this data directory, made on first use; kept after, so radiologists trust it once."""
    if files.ca_certificate.is_file() and files.ca_key.is_file():
        try:
            cert = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
            key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        except ValueError as exc:
            raise CertificateRefused("SITE_CA_UNREADABLE", f"{files.ca_certificate} or its key does not parse "
                                     f"({exc}); move both away to make a new site CA, which every radiologist's "
                                     "computer must then trust again") from exc
        if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > _now():
            return cert, key
    cert, key = make_site_ca(site_name)
    _write_private(files.ca_key, _pem_key(key))
    _write(files.ca_certificate, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The host names and addresses a certificate is valid for (its subjectAltName)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def _current_is_fine(files: TLSFiles, ca: x509.Certificate, names: list[str]) -> x509.Certificate | None:
    """The server certificate in place, when the site CA issued it for exactly ``names`` and it is not near expiry."""
    cert = _read_certificate(files.certificate)
    if cert is None or not files.key.is_file():
        return None
    if cert.issuer != ca.subject or sorted(certificate_names(cert)) != sorted(names):
        return None
    if cert.not_valid_after_utc - _now() < datetime.timedelta(days=RENEW_WITHIN_DAYS):
        return None
    return cert


def site_certificate(home: Path, names: list[str], site_name: str = "") -> ServerCertificate:
    """Put a server certificate signed by the site CA in place for ``names`` (kept when it still fits)."""
    files = TLSFiles.of(home)
    ca, ca_key = _site_ca(files, site_name)
    cert = _current_is_fine(files, ca, names)
    issued = cert is None
    if cert is None:
        cert, key = issue_server_certificate(ca, ca_key, names)
        _write_private(files.key, _pem_key(key))
        _write(files.certificate, cert.public_bytes(serialization.Encoding.PEM))
    return ServerCertificate(tuple(certificate_names(cert)), cert.not_valid_after_utc, ca.subject.rfc4514_string(),
                             site_ca=True, issued=issued)


def check_own_certificate(cert_pem: bytes, key_pem: bytes, now: datetime.datetime | None = None
                          ) -> tuple[list[x509.Certificate], bytes]:
    """The admin's certificate chain and key, checked: they parse, the key is the certificate's, it is valid now.

    Raises :class:`CertificateRefused` with CERT_UNREADABLE, KEY_UNREADABLE, KEY_MISMATCH, CERT_NOT_YET_VALID
    or CERT_EXPIRED.
    """
    now = now or _now()
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CertificateRefused("CERT_UNREADABLE", f"the certificate is not a PEM certificate ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateRefused("KEY_UNREADABLE", "the key is not an unencrypted PEM private key "
                                 f"(nginx must read it unattended): {exc}") from exc
    leaf = chain[0]
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, raw)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, raw)):
        raise CertificateRefused("KEY_MISMATCH", "the private key does not belong to the certificate "
                                 f"({leaf.subject.rfc4514_string()})")
    if leaf.not_valid_before_utc > now:
        raise CertificateRefused("CERT_NOT_YET_VALID", "the certificate is valid only from "
                                 f"{leaf.not_valid_before_utc:%Y-%m-%d} (is the clock of this box right?)")
    if leaf.not_valid_after_utc <= now:
        raise CertificateRefused("CERT_EXPIRED", f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    return chain, key_pem


def own_certificate(home: Path, cert_path: Path, key_path: Path) -> ServerCertificate:
    """Check the admin's certificate and key (:func:`check_own_certificate`), then put them in place of the site's."""
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise CertificateRefused("UNREADABLE", f"cannot read {exc.filename}: {exc.strerror}") from exc
    chain, key_pem = check_own_certificate(cert_pem, key_pem)
    files = TLSFiles.of(home)
    _write_private(files.key, key_pem)
    _write(files.certificate, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    leaf = chain[0]
    return ServerCertificate(tuple(certificate_names(leaf)), leaf.not_valid_after_utc, leaf.issuer.rfc4514_string(),
                             site_ca=False, issued=True)


def give_to_owner(home: Path, *paths: Path) -> None:
    """Run as root, hand ``keys/https/`` (and ``paths``) to the data directory's owner: nginx and the web run
    as that account and must read them. Otherwise nothing to do."""
    if os.geteuid() != 0:
        return
    owner = home.stat()
    folder = TLSFiles.of(home).folder
    for path in (folder.parent, folder, *folder.iterdir(), *paths):
        if path.exists():
            os.chown(path, owner.st_uid, owner.st_gid)


def site_ca_pem(home: Path) -> bytes | None:
    """The site CA certificate (PEM) for radiologists' computers to trust, or None before ``https setup``."""
    path = TLSFiles.of(home).ca_certificate
    return path.read_bytes() if path.is_file() else None


@dataclasses.dataclass(frozen=True)
class ProxyOptions:
    """What the nginx configuration needs to know: ports, the web UI's port, the upload limit, the files."""

    files: TLSFiles
    web_port: int
    max_upload_bytes: int
    port: int = 443
    http_port: int = 80
    listen_address: str = ""  # empty: every address of the box


def _listen(address: str, port: int) -> str:
    if not address:
        return str(port)
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def nginx_config(opts: ProxyOptions) -> str:
    """nginx.conf for the proxy; relative paths (logs, pid, spooled bodies) are under nginx's prefix (``-p``)."""
    https_port = "" if opts.port == 443 else f":{opts.port}"
    return f"""# Written by `appliance https setup`: TLS in front of the web UI on 127.0.0.1:{opts.web_port}.
worker_processes 1;
pid nginx.pid;
error_log logs/error.log warn;
events {{ worker_connections 512; }}

http {{
    access_log logs/access.log;
    client_body_temp_path temp/client_body;
    proxy_temp_path temp/proxy;
    fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi;
    scgi_temp_path temp/scgi;
    server_tokens off;

    # plain HTTP only says where the UI is
    server {{
        listen {_listen(opts.listen_address, opts.http_port)} default_server;
        server_name _;
        return 301 https://$host{https_port}$request_uri;
    }}

    server {{
        listen {_listen(opts.listen_address, opts.port)} ssl default_server;
        server_name _;
        ssl_certificate {opts.files.certificate};
        ssl_certificate_key {opts.files.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {CIPHERS};
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:appliance:1m;
        ssl_session_timeout 1d;
        ssl_session_tickets off;
        client_max_body_size {opts.max_upload_bytes};
        proxy_hide_header Strict-Transport-Security;
        add_header Strict-Transport-Security "{HSTS}" always;

        location / {{
            proxy_pass http://127.0.0.1:{opts.web_port};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""


def systemd_unit(config_path: Path, user: str, home: Path, state: Path = PROXY_STATE, nginx: Path = NGINX) -> str:
    """The unit running nginx as the data directory's owner (it reads the keys there), port 443 by capability."""
    return f"""[Unit]
Description=CT screening appliance: HTTPS for the web UI (nginx)
After=network-online.target appliance-web.service
Wants=appliance-web.service

[Service]
Type=exec
User={user}
ExecStartPre=/usr/bin/mkdir -p {state}/logs {state}/temp
ExecStart={nginx} -c {config_path} -p {state} -g 'daemon off;'
ExecReload=/bin/kill -HUP $MAINPID
StateDirectory={state.name}
StateDirectoryMode=0700
Restart=on-failure
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
ProtectSystem=strict
ReadOnlyPaths={home}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
PrivateMounts=yes
RemoveIPC=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def write_proxy(dest: Path | None, opts: ProxyOptions, *, user: str, home: Path) -> list[Path]:
    """Write nginx.conf and the unit into ``dest`` for review, or (``dest`` None) into /etc where they run."""
    config_file = SYSTEM_CONFIG if dest is None else dest / "nginx.conf"
    unit_file = SYSTEM_UNIT if dest is None else dest / UNIT_NAME
    for path, text in ((config_file, nginx_config(opts)), (unit_file, systemd_unit(SYSTEM_CONFIG, user, home))):
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, text.encode())
    return [config_file, unit_file]


def days_left(path: Path) -> int | None:
    """Whole days until the certificate at ``path`` expires (negative once expired), or None without a readable one."""
    cert = _read_certificate(path)
    return None if cert is None else (cert.not_valid_after_utc - _now()).days


def _read_certificate(path: Path) -> x509.Certificate | None:
    """The first certificate in the PEM file at ``path``; None when there is none or it does not parse."""
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError):
        return None

