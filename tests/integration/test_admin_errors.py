"""The admin API and the supervisor's operator refusing what they cannot do,
each with a clear JSON error: bad bodies, unknown operations, a second
operation while one runs, bad or deploy-only configs, a rollback with no
previous generation, and `broker deploy|reload` printing each outcome.
One broker serves the module and is stopped with SIGTERM at the end, so
the supervisor's lines are measured."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
import zmq
from click.testing import CliRunner

from broker.admin import ask_supervisor
from broker.cli import main
from broker.testing import BrokerProcess, free_port

pytestmark = pytest.mark.timeout(120)


class FileBroker(BrokerProcess):
    """Host and port come from the config file, not flags, so a new file may try to move them."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "broker", "serve", *self.args]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A one-shard broker started from a config file (so deploys have a file to move to)."""
    directory = tmp_path_factory.mktemp("admin")
    config = directory / "broker.toml"
    broker = FileBroker(args=["--config", str(config)], log_path=str(directory / "broker.log"))
    config.write_text(f'allow_anonymous = true\nshards = 1\nport = {broker.port}\napi_key = "{broker.api_key}"\n')
    broker.start()
    yield broker, directory
    assert broker.stop() == 0, "the supervisor must stop cleanly (and save its coverage)"


def admin_endpoint(broker: BrokerProcess) -> str:
    """The supervisor's admin socket, as its shards are told it (cluster.json of the run)."""
    assert broker.process is not None
    for child in psutil.Process(broker.process.pid).children(recursive=True):
        args = child.cmdline()
        if "broker.worker" in args:
            run_dir = args[args.index("broker.worker") + 1]
            with open(os.path.join(run_dir, "cluster.json"), encoding="utf-8") as fh:
                return str(json.load(fh)["admin"])
    raise AssertionError("no shard worker found")


def ask(broker: BrokerProcess, op: str, args: dict) -> tuple[list[str], dict]:
    return asyncio.run(ask_supervisor(admin_endpoint(broker), op, args, timeout=60))


def admin(broker: BrokerProcess, op: str, body: object | bytes) -> tuple[int, list[str], dict]:
    """POST /api/admin/<op>: the status, the progress lines and the result (the NDJSON's last line)."""
    status, reply = broker.api("POST", f"/api/admin/{op}", body)
    lines = reply.splitlines() if isinstance(reply, str) else [json.dumps(reply)]
    return status, [json.loads(line)["progress"] for line in lines[:-1]], json.loads(lines[-1])


def test_the_admin_socket_refuses_unknown_operations_and_non_path_configs(served):
    broker, _ = served
    _, result = ask(broker, "restart", {})
    assert result == {"ok": False, "operation": "restart", "status": 404, "error": "unknown operation 'restart'"}
    _, result = ask(broker, "reload", {"config": 5})
    assert (result["ok"], result["status"], result["key"]) == (False, 400, "config")


def test_an_unparsable_admin_message_reloads_the_file_loaded_last(served):
    broker, _ = served
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(admin_endpoint(broker))
    try:
        sock.send_multipart([b"reload", b"{not json"])
        assert sock.poll(60_000), "the supervisor did not answer"
        while True:
            kind, payload = sock.recv_multipart()
            if kind == b"result":
                break
        result = json.loads(payload)
        assert result["ok"] is True and result["operation"] == "reload" and result["changes"] == []
    finally:
        sock.close()


def test_the_http_admin_api_refuses_a_body_that_is_not_json(served):
    broker, _ = served
    status, _, result = admin(broker, "reload", b"{config:")
    assert status == 400 and "invalid JSON body" in result["error"]


def test_bad_and_deploy_only_configs_are_refused_naming_the_key(served):
    broker, directory = served
    bad = directory / "bad.toml"
    bad.write_text("shards = 0\n")
    for op in ("reload", "deploy"):
        status, progress, result = admin(broker, op, {"config": str(bad)})
        assert status == 400 and result["key"] == "shards", result
        assert any("bad.toml" in line for line in progress)
    # port 0 means the port the supervisor holds; a relative state_dir is made absolute.
    more = directory / "more.toml"
    more.write_text(f'allow_anonymous = true\nshards = 2\nport = 0\napi_key = "{broker.api_key}"\n'
                    'state_dir = "state"\n')
    status, _, result = admin(broker, "reload", {"config": str(more)})
    assert status == 409 and result["key"] in ("shards", "state_dir") and "deploy" in result["error"]
    changes = {c["key"]: c for c in result["changes"]}
    assert set(changes) == {"shards", "state_dir"}
    assert changes["state_dir"]["new"] == os.path.join(os.getcwd(), "state")
    moved = directory / "moved.toml"
    moved.write_text(f'allow_anonymous = true\nshards = 1\nport = {free_port()}\napi_key = "{broker.api_key}"\n')
    status, _, result = admin(broker, "deploy", {"config": str(moved)})
    assert status == 409 and result["key"] == "port" and "listening socket" in result["error"]


def test_rollback_deploy_busy_and_rollback_again(served):
    broker, directory = served
    status, _, result = admin(broker, "rollback", {"config": None})
    assert status == 409 and "no previous generation" in result["error"]

    newer = directory / "newer.toml"
    newer.write_text(f'allow_anonymous = true\nshards = 1\nport = {broker.port}\napi_key = "{broker.api_key}"\n'
                     "[namespaces.bill]\nhistory_size = 7\n[deploy]\nfirst_wave_watch = 2\n")
    outcome: dict[str, object] = {}

    def deploy() -> None:
        while True:   # a probing reload may hold the operator for a moment: 409, try again
            outcome["deploy"] = admin(broker, "deploy", {"config": str(newer)})
            status, _, result = outcome["deploy"]
            if status != 409 or "in progress" not in str(result.get("error")):
                return
            time.sleep(0.02)

    runner = threading.Thread(target=deploy)
    runner.start()
    # While the deploy runs, a second operation is refused (409), not queued.
    deadline = time.monotonic() + 30
    while True:
        _, result = ask(broker, "reload", {"config": None})
        if result.get("status") == 409 and "in progress" in result["error"]:
            break
        assert runner.is_alive() and time.monotonic() < deadline, f"never refused as busy: {result}"
        time.sleep(0.05)
    assert result["error"] == "a deploy is in progress; try again when it ends"
    runner.join(120)
    status, _, result = outcome["deploy"]
    assert status == 200 and result["ok"] is True, result

    # The deployed file is now the one a plain reload reads.
    progress, result = ask(broker, "reload", {"config": None})
    assert result["ok"] and any("newer.toml" in line for line in progress), result

    progress, result = ask(broker, "rollback", {"config": None})
    assert result["ok"] is True, result
    assert any("rolling back" in line for line in progress)


def test_cli_operations_print_each_outcome(served):
    broker, directory = served
    runner = CliRunner()
    bad = directory / "bad.toml"
    bad.write_text("shards = 0\n")
    result = runner.invoke(main, ["reload", "--url", broker.url, "--api-key", broker.api_key,
                                  "--config", str(bad)])
    assert result.exit_code == 2, result.output
    assert "error: shards:" in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["key"] == "shards"

    result = runner.invoke(main, ["reload", "--url", broker.url, "--api-key", "wrong"])
    assert result.exit_code == 1
    assert json.loads(result.stdout.splitlines()[-1])["ok"] is False and "error:" in result.stderr

    closed = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(main, ["deploy", "--url", closed])
    assert result.exit_code == 1
    assert "cannot reach the broker" in json.loads(result.stdout.splitlines()[-1])["error"]


class _TextProxy(BaseHTTPRequestHandler):
    """Something in front of the broker answering text, not NDJSON."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"<html>502 Bad Gateway</html>\n"
        self.send_response(502)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_cli_operation_through_a_proxy_answering_text():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TextProxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = CliRunner().invoke(main, ["reload", "--url", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 1
    assert json.loads(result.stdout.splitlines()[-1]) == {"ok": False, "operation": "reload", "error": "empty reply"}


def test_ask_supervisor_gives_up_with_a_504_when_no_one_answers():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    progress, result = asyncio.run(ask_supervisor(endpoint, "reload", {}, timeout=0.2))
    assert progress == [] and result["status"] == 504 and "did not answer" in result["error"]
