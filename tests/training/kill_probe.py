"""``diffusion-blend-train`` that SIGKILLs itself inside its N-th checkpoint write (test helper).

DB_KILL_AT=rename:N  -- after the N-th checkpoint folder is fully written, before its rename;
DB_KILL_AT=latest:N  -- after the N-th checkpoint is renamed, before ``latest`` points to it.
"""

import os
import signal
import sys

where, _, nth = os.environ["DB_KILL_AT"].partition(":")
calls = {"n": 0}
real_rename, real_replace = os.rename, os.replace


def _maybe_die():
    calls["n"] += 1
    if calls["n"] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


def rename(src, dst, *a, **kw):
    if where == "rename" and os.path.basename(str(dst)).startswith("step-"):
        _maybe_die()
    return real_rename(src, dst, *a, **kw)


def replace(src, dst, *a, **kw):
    if where == "latest" and os.path.basename(str(dst)) == "latest":
        _maybe_die()
    return real_replace(src, dst, *a, **kw)


os.rename, os.replace = rename, replace

from diffusion_blend.training.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
