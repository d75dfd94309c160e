"""A task that scrapes its own daemon's /metrics, as any task with network = "host" can try (tests/test_metrics.py)."""

import urllib.error
import urllib.request


def scrape(options):
    """Read the metrics token from options["token_file"] if it can, then GET options["url"] with it (or none);
    the HTTP status, and whether it found the token."""
    try:
        with open(options["token_file"]) as f:
            token = f.read().strip()
    except OSError:
        token = ""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(options["url"], headers=headers), timeout=10) as page:
            status = page.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return True, {"status": status, "read_the_token": bool(token)}
