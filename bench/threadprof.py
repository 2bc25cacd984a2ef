"""cProfile of every thread of a Python program, one file per thread.

    python -m bench.threadprof OUTSTEM -m MODULE [ARGS...]

Why: ``python -m cProfile`` sees only the main thread, and the chunk server
does its disk work (SQLite) on a worker thread, so its profile would leave
out half its CPU. This runs MODULE as ``__main__`` with a profiler in the
main thread and one in each thread started afterwards (threading.setprofile:
the first call a new thread makes enables its own cProfile.Profile), and at
exit writes OUTSTEM-main.prof and OUTSTEM-THREADNAME.prof. As with cProfile,
the program must end normally (return, sys.exit or a handled SIGTERM) for
the files to be written.
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import threading
from typing import Any

_profiles: list[tuple[str, cProfile.Profile]] = []
_lock = threading.Lock()


def _start_thread_profile(*_: Any) -> None:
    """The first profile event of a new thread: enable its own profiler
    (which replaces this hook for the thread)."""
    prof = cProfile.Profile()
    with _lock:
        _profiles.append((threading.current_thread().name, prof))
    prof.enable()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "-m":
        sys.exit("usage: python -m bench.threadprof OUTSTEM -m MODULE [ARGS...]")
    stem, module, args = argv[0], argv[2], argv[3:]
    sys.argv = [module, *args]
    threading.setprofile(_start_thread_profile)
    main_prof = cProfile.Profile()
    code: Any = 0
    main_prof.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    finally:
        main_prof.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
        main_prof.dump_stats(f"{stem}-main.prof")
        with _lock:
            seen: dict[str, int] = {}
            for name, prof in _profiles:
                n = seen[name] = seen.get(name, 0) + 1
                safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
                prof.create_stats()
                if prof.stats:  # type: ignore[attr-defined]
                    prof.dump_stats(f"{stem}-{safe}{'' if n == 1 else f'-{n}'}.prof")
    sys.exit(code)


if __name__ == "__main__":
    main()
