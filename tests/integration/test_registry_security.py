"""Attacks on the running registry (issue 10, findings 6 and 8): `compression devices serve` in a subprocess.

Each test starts the real server (uvicorn, the CLI's entry point) over a SQLite
file seeded through the Registry service, and attacks it over HTTP or a raw
socket from this process, as a client on the network would: timing of sign-ins,
password guessing, hashing that stalls the server, unauthenticated bodies, the
headers and cookies a browser is given, the OpenAPI page, the database file's
mode. Timings are compared within one run (ratios), never to fixed numbers.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import pytest

from compression.localservers import free_port
from devices.registry import schemas as s
from devices.registry.db import make_engine, migrate, session_factory
from devices.registry.service import SYSTEM, Registry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLINIC: Final = "bowvalley"
ANN, ANN_PASSWORD = "ann@bowvalley.example", "larch-meadow-1931-otter"
ADMIN_TOKEN: Final = "4c1d9e7b2a8f6053e9b1c7d4a2f8e6b0c3d5a7f9e1b3c5d7a9f1e3b5c7d9a1f3"
UNKNOWN: Final = "nobody@bowvalley.example"
# Sign-ins compared for timing, and /healthz requests measured idle and under load.
TIMING_ROUNDS: Final = 15
HEALTH_REQUESTS: Final = 40
LOGIN_LOOPS: Final = 3


@dataclass(frozen=True, slots=True)
class Server:
    """A running registry: its base URL, database file and the process."""

    url: str
    port: int
    database: Path
    process: subprocess.Popen[str]


def _seed(database: Path) -> None:
    engine = make_engine(f"sqlite:///{database}")
    try:
        migrate(engine)
        registry = Registry(session_factory(engine))
        registry.create_clinic(SYSTEM, s.ClinicIn(code=CLINIC, name="Bow Valley", timezone="America/Edmonton"))
        registry.create_physio(SYSTEM, s.PhysioIn(clinic=CLINIC, name="Ann Lee", email=ANN, password=ANN_PASSWORD))
        registry.create_patient(SYSTEM, s.PatientIn(clinic=CLINIC, code="BV-0001", display_name="Alice", physio=ANN))
    finally:
        engine.dispose()


@contextmanager
def serve(tmp_path: Path, seed: bool = True, **settings: str) -> Iterator[Server]:
    """`compression devices serve` on a free port with ``COMPRESSION_REGISTRY_<NAME>`` settings; stopped after."""
    database = tmp_path / "data" / "registry.db"
    if seed:
        _seed(database)
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "COMPRESSION_REGISTRY_DATABASE_URL": f"sqlite:///{database}", "COMPRESSION_REGISTRY_PORT": str(port),
           "COMPRESSION_REGISTRY_BOOTSTRAP_ADMIN_TOKEN": ADMIN_TOKEN,
           **{f"COMPRESSION_REGISTRY_{k.upper()}": v for k, v in settings.items()}}  # fmt: skip
    cli = Path(sys.executable).parent / "compression"
    process = subprocess.Popen([str(cli), "devices", "serve"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the registry did not start: {process.stdout.read() if process.stdout else ''}")
            time.sleep(0.1)
        yield Server(url, port, database, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _login_form(client: httpx.Client) -> str:
    """Open the sign-in page (its CSRF cookie lands in ``client``); the form's CSRF value."""
    page = client.get("/ui/login")
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert page.status_code == 200 and match, page.text[:500]
    return match.group(1)


def _sign_in(client: httpx.Client, email: str, password: str, headers: dict[str, str] | None = None) -> httpx.Response:
    csrf = _login_form(client)
    return client.post("/ui/login", data={"csrf": csrf, "email": email, "password": password, "next": "/ui/patients"},
                       headers=headers)  # fmt: skip


def _timed(call: Callable[[], httpx.Response]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# --- finding 6: sign-ins --------------------------------------------------------------------------------------------


def test_a_sign_in_takes_as_long_for_an_unknown_e_mail_as_for_a_known_one(tmp_path: Path) -> None:
    """Median time of wrong-password sign-ins, known vs unknown e-mail, alternated: within 1.5x of each other."""
    with serve(tmp_path, login_free_failures_per_account="1000", login_free_failures_per_address="1000") as server:
        known: list[float] = []
        unknown: list[float] = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(TIMING_ROUNDS):
                for email, times in ((ANN, known), (UNKNOWN, unknown)):
                    form = {"csrf": _login_form(client), "email": email, "password": "not-the-password-at-all",
                            "next": "/ui/patients"}  # fmt: skip
                    started = time.perf_counter()
                    answer = client.post("/ui/login", data=form)
                    times.append(time.perf_counter() - started)
                    assert answer.status_code == 403 and "Wrong e-mail or password" in answer.text, answer.text
        ratio = statistics.median(known) / statistics.median(unknown)
        print(f"sign-in median known {statistics.median(known) * 1000:.1f} ms, unknown "
              f"{statistics.median(unknown) * 1000:.1f} ms, ratio {ratio:.2f}")  # fmt: skip
        assert 1 / 1.5 < ratio < 1.5, f"known/unknown sign-in time ratio {ratio:.2f}: the timing tells them apart"


def _healthz_median(url: str) -> float:
    with httpx.Client(base_url=url, timeout=30) as client:
        return statistics.median(_timed(lambda: client.get("/healthz")) for _ in range(HEALTH_REQUESTS))


def test_password_hashing_does_not_stall_the_server(tmp_path: Path) -> None:
    """/healthz while three sign-in loops run stays within 4x of /healthz idle (it was 14x: hashing on the loop)."""
    with serve(tmp_path) as server:
        idle = _healthz_median(server.url)
        stop = threading.Event()
        signed_in = [0] * LOGIN_LOOPS

        def loop(index: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not stop.is_set():
                    assert _sign_in(client, ANN, ANN_PASSWORD).status_code == 303
                    client.cookies.clear()
                    signed_in[index] += 1

        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(LOGIN_LOOPS)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # the loops are hashing
        try:
            loaded = _healthz_median(server.url)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        ratio = loaded / idle
        print(f"/healthz median idle {idle * 1000:.1f} ms, with {LOGIN_LOOPS} sign-in loops {loaded * 1000:.1f} ms "
              f"(ratio {ratio:.1f}); sign-ins meanwhile {sum(signed_in)}")  # fmt: skip
        assert all(signed_in), "a sign-in loop made no progress"
        assert ratio < 4, f"/healthz is {ratio:.1f}x slower while people sign in"


def _audit(server: Server, entity: str) -> list[dict[str, object]]:
    response = httpx.get(f"{server.url}/api/v1/audit", params={"entity": entity, "limit": 1000},
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})  # fmt: skip
    assert response.status_code == 200, response.text
    entries: list[dict[str, object]] = response.json()
    return entries


ATTACKER: Final = {"X-Forwarded-For": "203.0.113.7"}
CLINIC_DESK: Final = {"X-Forwarded-For": "198.51.100.20"}
STRANGER: Final = {"X-Forwarded-For": "192.0.2.99"}


def test_guessing_a_password_locks_the_account_but_not_out_of_its_physio(tmp_path: Path) -> None:
    with serve(tmp_path, trusted_proxies="127.0.0.1") as server, httpx.Client(base_url=server.url) as client:
        assert _sign_in(client, ANN, ANN_PASSWORD, CLINIC_DESK).status_code == 303  # Ann, at her clinic's desk
        client.cookies.clear()
        answers = [_sign_in(client, ANN, f"guess-number-{i}-of-many", ATTACKER).status_code for i in range(8)]
        assert answers == [403] * 5 + [429] * 3, answers  # the 6th wrong password locks, and says so
        locked = _sign_in(client, ANN, ANN_PASSWORD, STRANGER)  # even the right password, from elsewhere
        assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
        assert "Too many wrong passwords" in locked.text and ANN_PASSWORD not in locked.text
        # The lock is no lever against Ann: from the address she signed in from, she still gets in.
        assert _sign_in(client, ANN, ANN_PASSWORD, CLINIC_DESK).status_code == 303
        client.cookies.clear()
        # An unknown e-mail is counted and locked the same way.
        answers = [_sign_in(client, UNKNOWN, f"guess-number-{i}-of-many", STRANGER).status_code for i in range(8)]
        assert answers == [403] * 5 + [429] * 3, answers
        entries = _audit(server, "login")
        failed = [e for e in entries if e["action"] == "login_failed"]
        locks = [e for e in entries if e["action"] == "login_locked"]
        assert len(failed) == 12 and {e["key"] for e in failed} == {ANN, UNKNOWN}
        assert {(e["key"], e["changes"]["scope"]) for e in locks} == {(ANN, "account"), (UNKNOWN, "account")}  # type: ignore[index]
        assert {e["changes"]["address"] for e in failed} == {"203.0.113.7", "192.0.2.99"}  # type: ignore[index]
        assert "guess-number" not in str(entries) and ANN_PASSWORD not in str(entries)


def test_an_address_that_guesses_is_locked_whatever_the_account(tmp_path: Path) -> None:
    with serve(tmp_path, trusted_proxies="127.0.0.1") as server, httpx.Client(base_url=server.url) as client:
        answers = [_sign_in(client, f"person{i}@bowvalley.example", "guess-number-one-of-many", ATTACKER).status_code
                   for i in range(22)]  # fmt: skip
        assert answers == [403] * 20 + [429] * 2, answers
        assert _sign_in(client, ANN, ANN_PASSWORD, ATTACKER).status_code == 429
        assert _sign_in(client, ANN, ANN_PASSWORD, STRANGER).status_code == 303


# --- finding 8: the network attacker ----------------------------------------------------------------------------------


def _raw_request(port: int, head: str, body: bytes = b"", wait_s: float = 3.0) -> bytes:
    """Send ``head`` (and the start of a body), then read what comes back within ``wait_s``."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pass
        return answer


THIRTY_MB: Final = 30 * 1024 * 1024


ADMIN: Final = f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
JSON: Final = "application/json"
FORM: Final = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("path", "auth", "kind", "announced", "chunked"),
    [("/api/v1/clinics", "", JSON, 413, 401), ("/api/v1/clinics", ADMIN, JSON, 413, 413),
     ("/ui/login", "", FORM, 413, 413), ("/ui/prescriptions/1", "", FORM, 413, 303)],
)  # fmt: skip
def test_a_30_mb_body_is_refused_before_it_is_read(tmp_path: Path, path: str, auth: str, kind: str, announced: int,
                                                   chunked: int) -> None:  # fmt: skip
    """Headers announce 30 MB, 1 KB is sent: the answer comes at once. Chunked, it stops at the limit (1 MiB)."""
    with serve(tmp_path) as server:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n{auth}"
        started = time.perf_counter()
        answer = _raw_request(server.port, head + f"Content-Length: {THIRTY_MB}\r\n\r\n", b"a" * 1024)
        took = time.perf_counter() - started
        assert answer.startswith(f"HTTP/1.1 {announced} ".encode()), (answer[:200], took)
        assert took < 2
        chunk = b"a" * 65536
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(40))  # 2.5 MiB
        answer = _raw_request(server.port, head + "Transfer-Encoding: chunked\r\n\r\n", body)
        assert answer.startswith(f"HTTP/1.1 {chunked} ".encode()), answer[:200]


def test_an_unauthenticated_api_request_is_refused_before_its_body_is_read(tmp_path: Path) -> None:
    """Under the size limit, but no token: 401 at once, without waiting for the 900 KB announced."""
    with serve(tmp_path) as server:
        head = (f"POST /api/v1/clinics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {JSON}\r\n"
                "Content-Length: 900000\r\n\r\n")
        started = time.perf_counter()
        answer = _raw_request(server.port, head, b"{" + b" " * 1023)
        assert answer.startswith(b"HTTP/1.1 401 "), (answer[:200], time.perf_counter() - started)
        assert time.perf_counter() - started < 2


def test_pages_and_answers_carry_security_headers(tmp_path: Path) -> None:
    with serve(tmp_path, trusted_proxies="127.0.0.1") as server, httpx.Client(base_url=server.url) as client:
        for response in (client.get("/ui/login"), client.get("/api/v1/clinics"), client.get("/healthz"),
                         client.get("/ui/static/style.css")):  # fmt: skip
            headers = response.headers
            assert headers["X-Content-Type-Options"] == "nosniff", response.url
            assert headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
            assert "default-src 'self'" in headers["Content-Security-Policy"]
            assert headers["Referrer-Policy"] == "same-origin"
            assert "Strict-Transport-Security" not in headers  # plain http: HSTS would be ignored or wrong
        behind_tls = client.get("/ui/login", headers={"X-Forwarded-Proto": "https"})
        assert behind_tls.headers["Strict-Transport-Security"].startswith("max-age=")


def test_the_openapi_page_is_off_unless_asked_for(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert httpx.get(server.url + path).status_code == 404, path
    with serve(tmp_path / "docs", api_docs="true") as server:
        assert httpx.get(server.url + "/openapi.json").status_code == 200
        docs = httpx.get(server.url + "/docs")
        assert docs.status_code == 200 and "frame-ancestors 'none'" in docs.headers["Content-Security-Policy"]


def _session_cookie(response: httpx.Response) -> str:
    return next(v for k, v in response.headers.multi_items() if k == "set-cookie" and "compression_session" in v)


def test_the_session_cookie_is_secure_behind_the_tls_proxy(tmp_path: Path) -> None:
    # The documented set-up: a TLS proxy in front, PUBLIC_URL https://...: the cookie is Secure whatever the proxy says.
    with serve(tmp_path, public_url="https://registry.example.org") as server, httpx.Client(base_url=server.url) as c:
        page = c.get("/ui/login")
        assert page.headers["Strict-Transport-Security"].startswith("max-age=")
        login_cookie = next(v for k, v in page.headers.multi_items() if k == "set-cookie")
        assert "Secure" in login_cookie
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        # The browser behind the proxy sends the (Secure) cookie back over https; here it is put in by hand.
        answer = c.post("/ui/login", headers={"Cookie": login_cookie.split(";", 1)[0]},
                        data={"csrf": csrf.group(1), "email": ANN, "password": ANN_PASSWORD, "next": "/ui/patients"})
        assert answer.status_code == 303 and "Secure" in _session_cookie(answer)
    # A trusted proxy's X-Forwarded-Proto is believed; an untrusted client's is not.
    with serve(tmp_path / "proxy", trusted_proxies="127.0.0.1") as server, httpx.Client(base_url=server.url) as c:
        assert "Secure" in _session_cookie(_sign_in(c, ANN, ANN_PASSWORD, {"X-Forwarded-Proto": "https"}))
    with serve(tmp_path / "direct") as server, httpx.Client(base_url=server.url) as c:
        assert "Secure" not in _session_cookie(_sign_in(c, ANN, ANN_PASSWORD, {"X-Forwarded-Proto": "https"}))


def test_the_registry_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    with serve(tmp_path, seed=False) as server:
        httpx.get(f"{server.url}/api/v1/clinics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        files = sorted(server.database.parent.glob("registry.db*"))
        assert [f.name for f in files] == ["registry.db", "registry.db-shm", "registry.db-wal"]
        for path in files:
            assert path.stat().st_mode & 0o077 == 0, f"{path.name} is {oct(path.stat().st_mode & 0o777)}"


def test_the_demo_seed_puts_no_fixed_password_into_the_registry(tmp_path: Path) -> None:
    from simulators.registration import DEMO_PASSWORD

    database = tmp_path / "registry.db"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "COMPRESSION_REGISTRY_DATABASE_URL": f"sqlite:///{database}"}  # fmt: skip
    seed = [sys.executable, str(ROOT / "deploy" / "demo" / "seed_registry.py"), "--credentials-out",
            str(tmp_path / "gateways.csv"), "--seed", "7", "--days", "1", "--connections", "2"]  # fmt: skip
    done = subprocess.run(seed, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert DEMO_PASSWORD not in done.stdout
    printed = dict(re.findall(r"^\s*(\S+@\S+)\s+password:\s+(\S+)$", done.stdout, re.MULTILINE))
    assert len(printed) == 2, done.stdout
    engine = make_engine(f"sqlite:///{database}")
    try:
        registry = Registry(session_factory(engine))
        for email, password in printed.items():
            assert registry.login(email, password)
            with pytest.raises(Exception, match="wrong e-mail or password"):
                registry.login(email, DEMO_PASSWORD)
        assert len(set(printed.values())) == 2
    finally:
        engine.dispose()
    again = subprocess.run(seed, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and "password:" not in again.stdout  # printed once
