"""server_network.py: the addresses a tracking server may listen on without TLS, the names it
answers to, and what its start message says of the passwords' way (no server started)."""

import pytest

from tools import server_network, tracking_server


def test_listening_beyond_loopback_needs_tls_or_insecure(tmp_path):
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        server_network.check_exposure(tracking_server.parse_args(["d", "--host", host])[0])
    for host in ("0.0.0.0", "::", "10.1.2.3", "lab.example"):
        args = tracking_server.parse_args(["d", "--host", host])[0]
        with pytest.raises(ValueError, match="clear text: put TLS in front: a reverse proxy"):
            server_network.check_exposure(args)
        server_network.check_exposure(
            tracking_server.parse_args(["d", "--host", host, "--insecure"])[0]
        )
    (tmp_path / "c.pem").write_text("")
    (tmp_path / "k.pem").write_text("")
    tls = ["--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")]
    server_network.check_exposure(tracking_server.parse_args(["d", "--host", "0.0.0.0", *tls])[0])
    with pytest.raises(ValueError, match="go together"):
        server_network.check_exposure(tracking_server.parse_args(["d", *tls[:2]])[0])


def test_the_start_message_says_how_the_passwords_travel(tmp_path):
    note = server_network.transport_note
    assert "To serve other machines, put TLS in front" in note(tracking_server.parse_args(["d"])[0])
    insecure = tracking_server.parse_args(["d", "--host", "0.0.0.0", "--insecure"])[0]
    assert note(insecure).startswith("WARNING: plain HTTP beyond this machine")
    tls = tracking_server.parse_args(["d", "--tls-cert", "c.pem", "--tls-key", "k.pem"])[0]
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in note(tls)
    assert server_network.public_url(tls) == "https://127.0.0.1:5000"


def test_the_server_answers_to_the_names_of_the_address_it_listens_on():
    assert server_network.client_names("127.0.0.1") == ["127.0.0.1", "localhost"]
    assert server_network.client_names("10.1.2.3") == ["10.1.2.3"]
