"""``server.fetch.address_allowed``: which destinations a remote image fetch may connect to by default."""
import pytest

from gracevlm.server.fetch import FetchFailed, address_allowed, fetch_url


@pytest.mark.parametrize("ip,ok", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("127.8.9.10", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("255.255.255.255", False),
    ("::1", False), ("fe80::1%eth0", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:8.8.8.8", True), ("not-an-ip", False)])
def test_address_allowed(ip, ok):
    assert address_allowed(ip) is ok


def test_blocked_before_connecting():
    for url in ("http://127.0.0.1:9/x.png", "http://localhost/x.png", "ftp://example.com/x", "http:///x",
                "http://127.0.0.1:99999/x"):
        with pytest.raises(FetchFailed):
            fetch_url(url, 2.0, 1000, allow_private=False)
