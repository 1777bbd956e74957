"""hub.strategy: every_save: each complete checkpoint converted to an adapter and pushed while
training, with publish's token, privacy and retry rules."""

import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from shardtune.export.convert import adapter_state
from shardtune.publish import model_card
from shardtune.publish.client import (
    HubError,
    hub_api,
    resolve_endpoint,
    resolve_token,
    scrub,
    shown_endpoint,
    with_retries,
)
from shardtune.publish.hub import adapter_items, bytes_item, commit_items, ensure_repo, namespaced


def checkpoint_adapter(checkpoint, adapter_config, out_dir):
    """A sharded FSDP checkpoint's adapter as a directory, read on this process alone."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(checkpoint), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(adapter_config, out_dir / "adapter_config.json")
    trainer_state = Path(checkpoint) / "trainer_state.json"
    if trainer_state.is_file():
        shutil.copy(trainer_state, out_dir / "trainer_state.json")
    return out_dir


class CheckpointPusher:
    """Pushes every saved checkpoint to the run's repo while training, as a loadable adapter at
    the repo root (what the Trainer's hub_strategy every_save does). Main process only.

    `start` checks the token, the repo and its privacy before training. `push` converts the
    checkpoint right away (it may be rotated away later) and commits it in a background
    thread, so training goes on; while a commit is running only the newest waiting checkpoint
    is kept. `finish` waits for the last commit. A failed push is logged, not fatal: the
    push_to_hub step publishes the final adapter anyway.
    """

    def __init__(self, settings, train_dir, *, run="run", log=print):
        self.settings, self.hub = settings, settings["hub"]
        self.train_dir, self.run, self.log = Path(train_dir), run, log
        self.endpoint = resolve_endpoint(self.hub)
        self.api = self.token = None
        self.pushed, self.failed = [], []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self._running = None
        self._waiting = None

    def start(self):
        if self.api is not None:
            return
        if self.hub["dry_run"]:
            self.api = "dry run"
            self.log(
                f"every_save, dry run: checkpoints would go to {shown_endpoint(self.endpoint)}/{self.hub['repo_id']}"
            )
            return
        self.token = resolve_token()
        self.api = hub_api(self.endpoint, self.token)
        retry = dict(hub=self.hub, endpoint=self.endpoint, token=self.token, log=self.log)
        self.hub = {**self.hub, "repo_id": namespaced(self.api, self.hub["repo_id"], **retry)}
        with_retries(
            lambda: ensure_repo(self.api, self.hub["repo_id"], self.hub["private"], self.log),
            hub=self.hub,
            endpoint=self.endpoint,
            repo_id=self.hub["repo_id"],
            token=self.token,
            log=self.log,
        )
        self.log(f"every_save: pushing checkpoints to {shown_endpoint(self.endpoint)}/{self.hub['repo_id']}")

    def stage(self, checkpoint, step, tokenizer=None):
        """The files to push for a checkpoint, in a temporary directory."""
        staging = Path(tempfile.mkdtemp(prefix=f"shardtune-push-{step}-"))
        try:
            checkpoint_adapter(checkpoint, self.train_dir / "adapter_config" / "adapter_config.json", staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            base = model_card.base_model_id(self.settings)
            items = adapter_items(staging, base)
            card = model_card.render(
                run=self.run,
                settings=self.settings,
                repo_id=self.hub["repo_id"],
                done={"global_step": step},
                status=f"Training in progress: checkpoint of step {step}, pushed while training"
                " (not yet converted and checked by the final publishing step).",
            )
            items.insert(0, bytes_item("README.md", card.encode()))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging, step, items

    def push(self, checkpoint, step, tokenizer=None):
        self.start()
        if self.hub["dry_run"]:
            self.log(f"every_save, dry run: would push {checkpoint} (step {step}) as an adapter")
            return
        staged = self.stage(checkpoint, step, tokenizer)
        with self._lock:
            if self._running is not None and not self._running.done():
                if self._waiting is not None:
                    self.log(f"every_save: step {self._waiting[1]} superseded by step {step} before it was pushed")
                    shutil.rmtree(self._waiting[0], ignore_errors=True)
                self._waiting = staged
                return
            self._running = self._executor.submit(self._commit, *staged)

    def _commit(self, staging, step, items):
        try:
            message = f"shardtune run {self.run}: training in progress, step {step}"
            with_retries(
                lambda: commit_items(self.api, self.hub["repo_id"], self.hub["private"], items, message, log=self.log),
                hub=self.hub,
                endpoint=self.endpoint,
                repo_id=self.hub["repo_id"],
                token=self.token,
                log=self.log,
            )
            self.pushed.append(step)
            self.log(f"every_save: pushed step {step}")
        except Exception as err:
            self.failed.append(step)
            message = str(err) if isinstance(err, HubError) else f"{type(err).__name__}: {err}"
            self.log(f"every_save: pushing step {step} failed: {scrub(message, self.token)}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with self._lock:
                nxt, self._waiting = self._waiting, None
                self._running = self._executor.submit(self._commit, *nxt) if nxt else None

    def finish(self):
        while True:
            with self._lock:
                running = self._running
            if running is None:
                break
            running.result()
            with self._lock:
                if self._running is running:
                    self._running = None
        self._executor.shutdown(wait=True)
        return {"pushed": self.pushed, "failed": self.failed}


def every_save_callback(settings, train_dir, *, run="run", log=print):
    """A transformers TrainerCallback pushing checkpoints when hub.push and hub.strategy:
    every_save are set, else None. Put it after MarkCompleteCheckpoints in the callbacks, so
    that a checkpoint is complete on every rank before it is pushed."""
    hub = settings["hub"]
    if not (hub["push"] and hub["strategy"] == "every_save"):
        return None
    from transformers import TrainerCallback

    pusher = CheckpointPusher(settings, train_dir, run=run, log=log)

    class PushCheckpoints(TrainerCallback):
        def __init__(self):
            self.pusher = pusher

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                pusher.start()

        def on_save(self, args, state, control, processing_class=None, **kwargs):
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                pusher.push(checkpoint, state.global_step, processing_class)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                pusher.finish()

    return PushCheckpoints()
