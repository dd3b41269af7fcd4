"""The tracking server's addresses: where it listens, the names it answers to, how passwords travel.

What this module teaches: basic auth sends every password with every request, so a server that
listens beyond loopback needs TLS (its own certificate, or a reverse proxy in front) or an explicit
--insecure (`check_exposure`); MLflow answers only to the names of the address it listens on (its
allow-list, `client_names`); and the start message says which of these holds (`transport_note`).
tracking_server.py uses it.
"""

import ipaddress
import os
import socket

EVERY_ADDRESS = ("0.0.0.0", "::")  # --host values that listen on all the machine's addresses
TLS_IN_FRONT = (
    "put TLS in front: a reverse proxy on this machine (Caddy: `caddy reverse-proxy --from "
    "NAME --to 127.0.0.1:PORT`; nginx: proxy_pass http://127.0.0.1:PORT) with this server on "
    "127.0.0.1, or --tls-cert and --tls-key"
)


def is_loopback(host):
    """Whether `host` (an address or a name) is this machine only: 127.0.0.0/8, ::1, localhost."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        return host == "localhost"


def check_exposure(args):
    """ValueError unless the logins are safe on the network the server listens on: loopback, or
    TLS (both files readable), or --insecure said."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    for path in filter(None, (args.tls_cert, args.tls_key)):
        if not os.access(path, os.R_OK):
            raise ValueError(f"cannot read {path}")
    if not (is_loopback(args.host) or args.tls_cert or args.insecure):
        raise ValueError(
            f"--host {args.host} listens beyond this machine, and basic auth would send every "
            f"password in clear text: {TLS_IN_FRONT}; or --insecure on a network you trust"
        )


def client_names(host):
    """The names clients may use for the address the server listens on: the MLflow allow-list."""
    if host in EVERY_ADDRESS:
        name = socket.gethostname()
        try:
            addresses = socket.gethostbyname_ex(name)[2]
        except OSError:  # a name that does not resolve
            addresses = []
        names = [socket.getfqdn(), name, *addresses, "localhost", "127.0.0.1"]
    else:
        names = [host, "localhost", "127.0.0.1"] if is_loopback(host) else [host]
    return list(dict.fromkeys(names))  # without repeats, in order


def check_port_is_free(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as error:
        raise OSError(
            f"cannot listen on {host} port {port}: {os.strerror(error.errno)} (another program: "
            f"`ss -ltnp 'sport = :{port}'` names it; or give another --port)"
        ) from None


def http_url(host, port, tls=False):
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def public_url(args):
    """The server's URL for clients: by the machine's name when it listens on all addresses."""
    host = socket.gethostname() if args.host in EVERY_ADDRESS else args.host
    return http_url(host, args.port, args.tls_cert)


def transport_note(args):
    """What the start message says of the passwords' way over the network."""
    if args.tls_cert:
        return (
            f"HTTPS with {args.tls_cert}; a client that does not trust its issuer sets "
            f"MLFLOW_TRACKING_SERVER_CERT_PATH to it."
        )
    if is_loopback(args.host):
        return f"Plain HTTP on this machine only. To serve other machines, {TLS_IN_FRONT}."
    return (
        "WARNING: plain HTTP beyond this machine (--insecure): passwords cross the network in "
        f"clear text. To stop that, {TLS_IN_FRONT}."
    )
