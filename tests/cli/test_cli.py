"""The `soma` command line against a running server's state: tenants, keys, models, chat, migrate."""

from __future__ import annotations

import re
import secrets
import subprocess
import time

import httpx
from alembic.script import ScriptDirectory

from somaagent.db import migrate
from tests.db.test_migrations import HEAD
from tests.support.postgres import create_database, drop_database
from tests.support.processes import SOMA, SomaServer, start_soma

MODEL = "smollm2-135m-instruct"


def test_server_starts_fast_and_prints_the_admin_key_once(server: SomaServer) -> None:
    assert server.started_in_s < 10
    stdout = (server.data_dir / "stdout.txt").read_text()
    assert stdout.count("sk-soma-") == 1
    assert "soma keys create" in stdout


def test_restart_keeps_state_and_prints_no_new_key(backend: str) -> None:
    database, url = create_database() if backend == "postgres" else (None, None)
    first = start_soma(url)
    try:
        created = httpx.post(
            f"{first.v1}/tenants",
            json={"name": "kept"},
            headers={"authorization": f"Bearer {first.admin_key}"},
        )
        assert created.status_code == 201
    finally:
        first.stop()
    second = start_soma(url, data_dir=first.data_dir, expect_key=False)
    try:
        assert "sk-soma-" not in (second.data_dir / "stdout.txt").read_text()
        tenants = httpx.get(f"{second.v1}/tenants", headers={"authorization": f"Bearer {first.admin_key}"})
        assert tenants.status_code == 200
        assert "kept" in [t["name"] for t in tenants.json()["data"]]
    finally:
        second.stop()
        if database:
            drop_database(database)


def test_tenants_and_keys_lifecycle(server: SomaServer) -> None:
    created = server.soma("tenants", "create", "cli-acme")
    assert created.returncode == 0, created.stderr
    assert "created tenant cli-acme" in created.stdout
    duplicate = server.soma("tenants", "create", "cli-acme")
    assert duplicate.returncode == 1
    assert "already exists" in duplicate.stderr
    bad = server.soma("tenants", "create", "Not Valid!")
    assert bad.returncode == 1 and "invalid tenant name" in bad.stderr
    assert "cli-acme" in server.soma("tenants", "list").stdout

    issued = server.soma("keys", "create", "--tenant", "cli-acme", "--name", "ci")
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()
    assert key.startswith("sk-soma-")
    assert "shown once" in issued.stderr

    # The key works at once against the running server.
    headers = {"authorization": f"Bearer {key}"}
    assert httpx.get(f"{server.v1}/models", headers=headers).status_code == 200

    listing = server.soma("keys", "list", "--tenant", "cli-acme")
    assert listing.returncode == 0
    assert key[:12] in listing.stdout and key not in listing.stdout  # prefix only, never the secret
    key_id = listing.stdout.split()[0]

    revoked = server.soma("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    # Another process revoked it: the server notices within its revocation poll (0.5 s).
    deadline = time.monotonic() + 3
    status = 200
    while time.monotonic() < deadline and status == 200:
        status = httpx.get(f"{server.v1}/models", headers=headers).status_code
        time.sleep(0.1)
    assert status == 401
    assert "revoked" in server.soma("keys", "list", "--tenant", "cli-acme").stdout
    assert server.soma("keys", "revoke", "key_doesnotexist").returncode == 1


def test_models_list_and_profiles(server: SomaServer) -> None:
    listing = server.soma("models", "list")
    assert listing.returncode == 0
    assert MODEL in listing.stdout and "all-minilm-l6-v2" in listing.stdout
    server.soma("tenants", "create", "cli-profiles")
    saved = server.soma(
        "models", "profile", "set", "--tenant", "cli-profiles", "chat", "dead-upstream", MODEL
    )
    assert saved.returncode == 0, saved.stderr
    assert "profile:chat" in saved.stdout
    shown = server.soma("models", "profile", "list", "--tenant", "cli-profiles")
    assert f"dead-upstream → {MODEL}" in shown.stdout
    wrong = server.soma("models", "profile", "set", "--tenant", "cli-profiles", "chat", "no-such-model")
    assert wrong.returncode == 1 and "does not exist" in wrong.stderr


def test_chat_streams_answers_through_the_api(server: SomaServer) -> None:
    run = server.soma(
        "chat",
        "--url",
        server.v1,
        "--key",
        server.admin_key,
        "--max-tokens",
        "12",
        input_text="Say hello.\nAnd again.\n/exit\n",
    )
    assert run.returncode == 0, run.stderr
    answers = [line for line in run.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(answers) == 2
    assert all(len(a) > len("assistant> ") for a in answers)


def test_chat_without_a_key_or_server_says_how_to_fix_it(server: SomaServer) -> None:
    env_less = server.soma("chat", "--url", server.v1)
    assert env_less.returncode == 2
    assert "soma keys create" in env_less.stderr
    nowhere = server.soma("chat", "--url", "http://127.0.0.1:9/v1", "--key", server.admin_key)
    assert nowhere.returncode == 1 and "soma serve" in nowhere.stderr


def test_migrate_reports_the_revision(server: SomaServer) -> None:
    run = server.soma("migrate")
    assert run.returncode == 0, run.stderr
    head = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()
    assert head == HEAD and f"revision {head}" in run.stdout


def test_users_lifecycle(server: SomaServer) -> None:
    tenant = f"cli-users-{secrets.token_hex(3)}"
    assert server.soma("tenants", "create", tenant).returncode == 0
    password = "correct horse battery staple"
    env_password = {**server.env, "SOMA_USER_PASSWORD": password}
    created = subprocess.run(
        [SOMA, "users", "create", "--tenant", tenant, "--username", "Ada@Example.com", "--role", "admin"],
        env=env_password,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    assert "ada@example.com" in created.stdout and password not in created.stdout + created.stderr
    form = {"grant_type": "password", "tenant": tenant, "username": "ada@example.com", "password": password}
    tokens = httpx.post(f"{server.v1}/auth/token", data=form)
    assert tokens.status_code == 200, tokens.text
    headers = {"authorization": f"Bearer {tokens.json()['access_token']}"}
    assert httpx.get(f"{server.v1}/users/me", headers=headers).status_code == 200

    service = server.soma("users", "create", "--tenant", tenant, "--username", "ci-bot", "--service")
    assert service.returncode == 0, service.stderr
    secret = re.search(r"client_secret: (cs-soma-\S+)", service.stdout)
    assert secret is not None
    weak = subprocess.run(
        [SOMA, "users", "create", "--tenant", tenant, "--username", "weak"],
        env={**server.env, "SOMA_USER_PASSWORD": "short"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert weak.returncode == 1 and "at least 12 characters" in weak.stderr

    listing = server.soma("users", "list", "--tenant", tenant)
    assert "ada@example.com" in listing.stdout and "ci-bot" in listing.stdout and "no-mfa" in listing.stdout

    disabled = server.soma("users", "disable", "ada@example.com", "--tenant", tenant)
    assert disabled.returncode == 0, disabled.stderr
    deadline = time.monotonic() + 5
    status = 200
    while status == 200 and time.monotonic() < deadline:
        status = httpx.get(f"{server.v1}/users/me", headers=headers).status_code
        time.sleep(0.1)
    assert status == 401  # another process revoked it: the server noticed within its poll
    assert httpx.post(f"{server.v1}/auth/token", data=form).status_code == 401
    assert server.soma("users", "enable", "ada@example.com", "--tenant", tenant).returncode == 0
    assert httpx.post(f"{server.v1}/auth/token", data=form).status_code == 200
    reset = server.soma("users", "reset-mfa", "ada@example.com", "--tenant", tenant)
    assert reset.returncode == 0, reset.stderr
    assert server.soma("users", "unlock", "ada@example.com", "--tenant", tenant).returncode == 0
    missing = server.soma("users", "disable", "nobody", "--tenant", tenant)
    assert missing.returncode == 1 and "no user" in missing.stderr
