"""``tally serve``: its worker processes run with the settings it was started with
(config file included), not only what the environment says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from query_api.ready import wait_ready
from tests.ingest.conftest import free_port
from tests.query_api.conftest import Api


def test_workers_run_with_the_config_file_settings(api: Api, tmp_path: Path) -> None:
    config = tmp_path / "tally.toml"
    config.write_text(f'data_dir = "{api.settings.data_dir}"\n\n[api]\npage_max = 3\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tally",
            "--config",
            str(config),
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        headers = {"Authorization": f"Bearer {api.keys['m1']}"}
        for _ in range(4):  # new connections: both workers answer
            resp = httpx.get(f"{url}/v1/transactions", params={"limit": 50}, headers=headers)
            assert resp.status_code == 200, resp.text
            assert len(resp.json()["items"]) == 3
    finally:
        server.terminate()
        server.wait(30)
