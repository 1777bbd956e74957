"""Output helpers: every output is complete or absent."""

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path


def _tmp_path(path):
    """This process's temporary sibling of `path`: `.<name>.tmp-<host>-<pid>`."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale(path):
    """Remove the temporaries of `path` that dead processes of this host left (a SIGKILL
    leaves them). Those of other hosts are kept: on a shared file system their process may
    still be writing, and that cannot be told from here. A name without a host (written
    before hosts were named) counts as this host's."""
    prefix, host = f".{path.name}.tmp-", socket.gethostname()
    if not path.parent.is_dir():
        return
    for tmp in path.parent.iterdir():
        if not tmp.name.startswith(prefix):
            continue
        owner, _, pid = tmp.name[len(prefix) :].rpartition("-")
        if owner not in ("", host) or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary sibling directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    _remove_stale(path)
    tmp = _tmp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary sibling path to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text):
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, data):
    """Write JSON atomically (temp file + rename)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def job(log_path, name=None):
    """Run a workflow step with its output in `log_path`. A UserError ends the step with
    one line on the console and in the log, and a non-zero exit; anything else too, its
    traceback kept in the log.

    Yields `log(*parts)`, which writes a line to the log; `log.console(*parts)` writes it to
    the log and to the console too (prefixed with the step's `name`), for what the user
    should see without opening the log."""
    import sys
    import traceback

    from shardtune.errors import UserError

    console = sys.stderr
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log:
        sys.stdout = sys.stderr = log

        def to_log(*parts):
            print(*parts, file=log, flush=True)

        def to_console(*parts):
            to_log(*parts)
            print(*([f"{name}:"] if name else []), *parts, file=console, flush=True)

        to_log.console = to_console
        try:
            yield to_log
        except UserError as err:
            print(f"ERROR: {err}", file=log)
            print(f"ERROR: {err}", file=console)
            raise SystemExit(1) from None
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as err:
            # The traceback is for the log; the console gets the line that says what failed.
            traceback.print_exc(file=log)
            text = str(err).strip().splitlines()
            print(f"ERROR: {type(err).__name__}: {text[0] if text else ''} (traceback in {log_path})", file=console)
            raise SystemExit(1) from None
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, console
