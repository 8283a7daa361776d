"""The supervisor's operations: reload, deploy, rollback (PROTOCOL.md §5,
docs/operations.md). One at a time; each reports progress lines and ends
with one result (a dict with ``ok``), which the admin API and the CLI print.

Deploy, step by step (every step is logged and reported):

1. A new generation starts from the code on disk (a snapshot of it) and
   the new config. Its shards bind their ZeroMQ sockets, lock their
   journals, then wait ("booted"). None of them accepts connections yet.
2. The serving generation is *fenced*: its home shards stop writing channel
   state (a publication answers 503, never a false 200) and confirm.
3. The new shards import the channels they are home of from every old
   journal (broker.handover) and report "ready".
4. Take-over: the new generation starts accepting on the shared listening
   socket, the old one stops (connections in the accept queue stay there
   for the new one). The old generation stays fenced.
5. Paced migration: the old shards ask their clients to reconnect in waves
   (``[deploy] wave_size`` per ``wave_interval`` for the whole node, each
   with a random ``after_ms`` up to ``max_after_ms``); clients resubscribe
   with ``recover`` on the new generation and get exactly what they missed.
6. The result is returned; the old generation is then stopped and its
   journals removed.

A new generation that does not boot or become ready in ``ready_timeout``,
or crashes before the take-over, is torn down and the old one is unfenced:
it never stopped accepting. One that crashes during the first wave (or the
``first_wave_watch`` after it) is replaced by a rollback: a newer
generation from the previous code and config that takes the state over
from the failed one's journals. Either way ``broker deploy`` fails with the
reason. ``rollback`` is a deploy of the previous generation's (code, config).
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import shutil
import time
from typing import Any
from collections.abc import Callable

from .config import Config
from .errors import ConfigError
from .generations import Generation, ShardProcess, describe_exit
from .handover import generation_journals, remove_journals
from .reload import ReloadRefused, apply_runtime, check_reload, diff

__all__ = ["Operator"]

log = logging.getLogger("broker.operations")

Progress = Callable[[str], None]
FENCE_TIMEOUT = 5.0      # seconds for the old generation to confirm the fence
APPLY_TIMEOUT = 10.0     # seconds for every shard to confirm a reload
MIN_REQUESTS = 20        # requests before a first wave's error rate is judged
RETIRE_DELAY = 1.0       # seconds between the deploy's result and stopping the old generation
DEPLOY_FIXED = ("host", "port")  # the listening socket is kept across generations


def _copy(config: Config) -> Config:
    return copy.deepcopy(config)


class Operator:
    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor
        self.busy: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.failures: dict[int, list[str]] = {}   # generation -> deaths seen while it was a candidate
        self.retiring: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------- from the shards
    def on_control(self, generation: Generation, message: dict[str, Any]) -> None:
        pid = message.get("pid")
        for key in ("ready", "booted", "applied", "fenced", "migrated", "health"):
            if key not in message:
                continue
            index = message["id"] if key in ("applied",) else message[key]
            if not isinstance(index, int) or not 0 <= index < len(generation.shards):
                return
            shard = generation.shards[index]
            if shard.pid != pid:
                return  # a late word from a dead predecessor
            if key == "ready":
                shard.up = shard.booted = True
                shard.ready_at = time.monotonic()
                generation.status_dirty = True
                log.info("generation %d: shard %d (pid %d) ready", generation.number, shard.id, shard.pid)
                self._forget_leftover(generation)
            elif key == "booted":
                shard.booted = True
            elif key == "applied":
                shard.applied = max(shard.applied, message["applied"])
            elif key == "fenced":
                shard.fenced = True
            elif key == "health":
                shard.health = message
            elif key == "migrated":
                shard.migrated = True
                shard.moved = message.get("clients", 0)
                log.info("generation %d: shard %d asked its %d client(s) to move", generation.number,
                         shard.id, message.get("clients", 0))

    def _forget_leftover(self, generation: Generation) -> None:
        """A --state-dir's journals from an earlier run, once taken over."""
        if self.sup.leftover and generation is self.sup.serving and all(s.up for s in generation.shards):
            remove_journals(self.sup.leftover)
            self.sup.leftover = []

    def deaths(self, generation: Generation, deaths: list[tuple[ShardProcess, int]]) -> None:
        for shard, code in deaths:
            if not generation.restart_dead:
                self.failures.setdefault(generation.number, []).append(
                    f"shard {shard.id} (pid {shard.pid}) {describe_exit(code)}")

    # ------------------------------------------------------------ requests
    def on_admin(self, frames: list[bytes]) -> None:
        identity, op, body = frames[0], frames[1].decode(), frames[2]
        try:
            args = json.loads(body) if body else {}
        except ValueError:
            args = {}
        self.submit(op, args if isinstance(args, dict) else {}, identity)

    def on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.sup.sources.file or "(no config file)")
        self.submit("reload", {"config": None}, None)

    def submit(self, op: str, args: dict[str, Any], identity: bytes | None) -> None:
        def reply(kind: bytes, payload: bytes) -> None:
            if identity is not None:
                self.sup.reply_admin([identity, kind, payload])

        if op not in ("reload", "deploy", "rollback"):
            reply(b"result", json.dumps({"ok": False, "operation": op, "status": 404,
                                         "error": f"unknown operation {op!r}"}).encode())
            return
        if self.busy is not None or self.sup.stopping:
            why = f"a {self.busy} is in progress" if self.busy else "the broker is stopping"
            log.warning("%s refused: %s", op, why)
            reply(b"result", json.dumps({"ok": False, "operation": op, "status": 409,
                                         "error": f"{why}; try again when it ends"}).encode())
            return
        self.busy = op

        def progress(text: str) -> None:
            log.info("%s: %s", op, text)
            reply(b"progress", text.encode())

        async def run() -> None:
            started = time.monotonic()
            try:
                config = args.get("config")
                if config is not None and not isinstance(config, str):
                    result: dict[str, Any] = {"ok": False, "status": 400, "key": "config",
                                              "error": "config must be a file path or null"}
                elif op == "reload":
                    result = await self.reload(config, progress)
                else:
                    result = await self.deploy(config, progress, rollback=op == "rollback")
            except asyncio.CancelledError:
                result = {"ok": False, "status": 503, "error": "the broker is stopping"}
            except Exception as exc:  # a bug must not leave the operator busy forever
                log.exception("%s failed", op)
                result = {"ok": False, "status": 500, "error": f"internal error: {exc!r}"}
            finally:
                self.busy = None
            result = {"ok": result.pop("ok"), "operation": op, **result,
                      "seconds": round(time.monotonic() - started, 3)}
            (log.info if result["ok"] else log.error)("%s result: %s", op, json.dumps(result))
            reply(b"result", json.dumps(result).encode())

        self.task = asyncio.get_running_loop().create_task(run())

    async def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    # -------------------------------------------------------------- reload
    def _load(self, file: str | None) -> tuple[Config | None, dict[str, Any] | None, str | None]:
        path = file or self.sup.sources.file
        try:
            return self.sup.settle(self.sup.sources.load(path)), None, path
        except ConfigError as exc:
            return None, {"ok": False, "status": 400, "key": exc.key, "error": exc.message}, path

    async def reload(self, file: str | None, progress: Progress) -> dict[str, Any]:
        generation = self.sup.serving
        new, failure, path = self._load(file)
        progress(f"read {path or '(no file: defaults, environment and flags)'}")
        if failure is not None:
            return failure
        assert new is not None
        try:
            changes = check_reload(generation.config, new)
        except ReloadRefused as exc:
            return {"ok": False, "status": 409, "key": exc.key, "error": exc.message,
                    "changes": [c.to_dict() for c in diff(generation.config, new)]}
        self.sup.sources.file = path
        if not changes:
            progress("nothing changes")
            return {"ok": True, "generation": generation.number, "config_version": generation.config_version,
                    "changes": []}
        for change in changes:
            progress(f"{change.key}: {change.old!r} -> {change.new!r}")
        apply_runtime(generation.config, new)
        generation.config_version += 1
        generation.write_spec()
        generation.status_dirty = True
        version = generation.config_version
        waiting = [s for s in generation.shards if s.up]
        progress(f"config version {version} sent to {len(waiting)} shard(s)")
        late = await self._until(lambda: all(s.applied >= version or not s.up for s in waiting),
                                 time.monotonic() + APPLY_TIMEOUT)
        if late:
            return {"ok": False, "status": 504, "error": "not every shard confirmed the new config in "
                    f"{APPLY_TIMEOUT:.0f}s (shards apply it when they see it)",
                    "changes": [c.to_dict() for c in changes]}
        progress(f"every shard applied config version {version}")
        return {"ok": True, "generation": generation.number, "config_version": version,
                "changes": [c.to_dict() for c in changes]}

    # -------------------------------------------------------------- deploy
    async def _until(self, done: Callable[[], bool], deadline: float,
                     failed: Callable[[], str | None] = lambda: None) -> str | None:
        """Wait until ``done()``; the reason when ``failed()`` says one or time runs out."""
        while not done():
            reason = failed()
            if reason:
                return reason
            if time.monotonic() >= deadline:
                return "timed out"
            await asyncio.sleep(0.05)
        return None

    def _candidate_failure(self, generation: Generation) -> Callable[[], str | None]:
        def check() -> str | None:
            deaths = self.failures.get(generation.number)
            return "; ".join(deaths) if deaths else None
        return check

    def _first_wave_failure(self, generation: Generation, max_error_rate: float) -> Callable[[], str | None]:
        """Why the new generation fails during the first wave: a shard died,
        one answers /readyz 503, or more than ``max_error_rate`` of its HTTP
        requests failed (5xx other than 503; judged from MIN_REQUESTS on)."""
        crashed = self._candidate_failure(generation)

        def check() -> str | None:
            reason = crashed()
            if reason:
                return reason
            reports = [s.health for s in generation.shards if s.health is not None]
            for report in reports:
                if report.get("not_ready"):
                    return f"shard {report['health']} fails /readyz: {report['not_ready']}"
            requests = sum(r["requests"] for r in reports)
            errors = sum(r["errors"] for r in reports)
            if requests >= MIN_REQUESTS and errors > max_error_rate * requests:
                return f"error rate {errors}/{requests} requests is above {max_error_rate:.0%}"
            return None
        return check

    async def deploy(self, file: str | None, progress: Progress, rollback: bool = False) -> dict[str, Any]:
        sup = self.sup
        old: Generation = sup.serving
        if rollback:
            if len(sup.history) < 2:
                return {"ok": False, "status": 409, "error": "no previous generation to roll back to"}
            code_dir, base = sup.history[-2]
            config = _copy(base)
            progress(f"rolling back to the code and config that served before generation {old.number}")
        else:
            loaded, failure, path = self._load(file)
            progress(f"read {path or '(no file: defaults, environment and flags)'}")
            if failure is not None:
                return failure
            assert loaded is not None
            config = loaded
            for key in DEPLOY_FIXED:
                if getattr(config, key) != getattr(old.config, key):
                    return {"ok": False, "status": 409, "key": key,
                            "error": "cannot change in a deploy (the listening socket is kept); "
                                     "restart the broker to move it"}
            code_dir = ""
        outcome = await self._deploy(old, config, code_dir, progress, rolling_back=rollback)
        if outcome["ok"] and not rollback and file:
            sup.sources.file = file
        return outcome

    async def _deploy(self, old: Generation, config: Config, code_dir: str, progress: Progress,
                      depth: int = 0, rolling_back: bool = False) -> dict[str, Any]:
        sup = self.sup
        started = time.monotonic()
        number = sup.allocate()
        code_dir = code_dir or sup.snapshot(number)
        sources = generation_journals(old.journal_dir, old.number)
        new = sup.new_generation(number, config, code_dir, sources, wait_for_import=True)
        new.phase = "starting"
        # PROTOCOL.md §3 phases; the old generation keeps its phase until it stops.
        old.phase = "rolling-back" if rolling_back or depth else "deploying"
        old.status_dirty = True
        progress(f"generation {new.number}: starting {len(new.shards)} shard(s)")
        new.start_all()
        deadline = started + config.deploy.ready_timeout
        failed = self._candidate_failure(new)
        why = await self._until(lambda: all(s.booted for s in new.shards), deadline, failed)
        if why:
            return await self._abandon(old, new, f"generation {new.number} did not start: {why}", progress)
        progress(f"generation {new.number} booted; fencing generation {old.number} "
                 "(publications answer 503 until the hand-over ends)")
        # With the fence, the old shards start following the new generation's
        # streams (broker.feed), so their clients stay live until they move.
        old.set(fenced=True, feed=new.endpoints.pub)
        fencing = [s for s in old.shards if s.process is not None]
        why = await self._until(lambda: all(s.fenced or s.process is None for s in fencing),
                                time.monotonic() + FENCE_TIMEOUT)
        if why:
            return await self._abandon(old, new, f"generation {old.number} did not confirm the fence: {why}",
                                       progress)
        fenced_at = time.monotonic()
        progress(f"generation {new.number}: taking over channel state from {len(sources)} journal(s)")
        new.set(**{"import": True})
        why = await self._until(lambda: all(s.up for s in new.shards), deadline, failed)
        if why:
            return await self._abandon(old, new, f"generation {new.number} did not become ready: {why}",
                                       progress)
        # Take-over: the new generation accepts first, then the old one stops.
        new.phase = "serving"
        new.set(accepting=True)
        old.set(accepting=False)
        sup.serving = new
        sup.config = config
        sup.history.append((code_dir, config))
        fenced_ms = round((time.monotonic() - fenced_at) * 1000, 1)
        progress(f"generation {new.number} serves (publications fenced for {fenced_ms:.0f} ms)")
        plan = config.deploy
        running = [s for s in old.shards if s.process is not None]
        share = max(1, math.ceil(plan.wave_size / max(1, len(running))))
        old.set(migrate={"wave_size": share, "wave_interval": plan.wave_interval,
                         "max_after_ms": plan.max_after_ms})
        progress(f"generation {old.number}: asking clients to reconnect in waves of {plan.wave_size} "
                 f"every {plan.wave_interval:g}s (after_ms up to {plan.max_after_ms})")
        watch_until = time.monotonic() + plan.wave_interval + plan.first_wave_watch
        new.set(report_health=True)
        why = await self._until(lambda: time.monotonic() >= watch_until, watch_until + 1,
                                self._first_wave_failure(new, plan.max_error_rate))
        new.set(report_health=False)
        if why and depth == 0:
            progress(f"generation {new.number} failed during the first wave ({why}): rolling back")
            new.phase = "rolling-back"
            back = await self._deploy(new, _copy(old.config), old.code_dir, progress, depth + 1, True)
            self._retire(old)
            if back["ok"]:
                sup.history.pop(-2)  # the failed generation is no one's "previous"
            else:
                new.restart_dead = True  # it serves on: restart what died
            return {"ok": False, "status": 502, "generation": sup.serving.number,
                    "error": f"generation {new.number} failed during the first wave: {why}; "
                             + (f"rolled back to generation {back['generation']}" if back["ok"]
                                else f"the rollback failed too: {back.get('error')}")}
        new.restart_dead = True
        self.failures.pop(new.number, None)
        why = await self._until(lambda: all(s.migrated or s.process is None for s in running),
                                time.monotonic() + 3600)
        progress(f"generation {old.number}: every client was asked to move")
        self._retire(old)
        return {"ok": True, "generation": new.number, "previous": old.number, "phase": "serving",
                "shards": len(new.shards), "fenced_ms": fenced_ms,
                "clients_asked": sum(s.moved for s in running)}

    async def _abandon(self, old: Generation, new: Generation, reason: str, progress: Progress) -> dict[str, Any]:
        """Before the take-over: tear the new generation down; the old one,
        which never stopped accepting, is unfenced and serves on."""
        progress(f"{reason}; tearing generation {new.number} down")
        await self._teardown(new)
        old.set(fenced=False, feed=None)
        old.phase = "serving"
        old.status_dirty = True
        progress(f"generation {old.number} keeps serving")
        return {"ok": False, "status": 502, "error": reason, "generation": old.number}

    async def _teardown(self, generation: Generation) -> None:
        generation.restart_dead = False
        await self.sup.stop_generation(generation, 5.0)
        remove_journals(generation_journals(generation.journal_dir, generation.number))
        self._forget(generation)
        if all(g.code_dir != generation.code_dir for g in self.sup.generations.values()) and \
                all(code != generation.code_dir for code, _ in self.sup.history):
            shutil.rmtree(generation.code_dir, ignore_errors=True)  # a snapshot nobody will run

    def _forget(self, generation: Generation) -> None:
        self.sup.generations.pop(generation.number, None)
        self.failures.pop(generation.number, None)
        generation.close()
        shutil.rmtree(generation.dir, ignore_errors=True)

    def _retire(self, generation: Generation) -> None:
        """After a deploy: stop the old generation (its clients were asked to
        move), then drop its journals, whose state lives on in the new one."""
        async def retire() -> None:
            await asyncio.sleep(RETIRE_DELAY)
            await self.sup.stop_generation(generation, self.sup.config.drain_timeout + 5.0)
            remove_journals(generation_journals(generation.journal_dir, generation.number))
            self._forget(generation)
            log.info("generation %d stopped", generation.number)

        task = asyncio.get_running_loop().create_task(retire())
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)
