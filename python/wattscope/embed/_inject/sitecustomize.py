"""Imported at start-up by every Python process under `wattscope run --kernels` (this directory is first on
PYTHONPATH): start wattscope's kernel tracer, then import the sitecustomize this file shadows, if there is one."""

import importlib
import os
import sys


def _start() -> None:
    try:
        from wattscope.embed.child_tracing import start_in_child
    except Exception as e:  # an interpreter without wattscope (another venv): say so, run the program anyway
        out_dir = os.environ.get("WATTSCOPE_RUN_KERNELS_DIR")
        if out_dir:
            import json

            doc = {"pid": os.getpid(), "executable": sys.executable, "argv": sys.argv,
                   "error": f"wattscope is not importable by {sys.executable}: {e}"}
            path = os.path.join(out_dir, f"{os.getpid()}.json")
            try:  # renamed into place: the parent may read the folder while this process still writes
                with open(path + ".tmp", "w") as f:
                    json.dump(doc, f)
                os.replace(path + ".tmp", path)
            except OSError:
                pass
        return
    start_in_child()


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    me = sys.modules.pop(__name__)
    try:
        importlib.import_module("sitecustomize")
    except ImportError as e:
        # The import system expects a module under this name once this file has run.
        sys.modules[__name__] = me
        if e.name != "sitecustomize":
            raise


_start()
_chain()
