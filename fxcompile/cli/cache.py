"""``fxcompile cache``: list or clear the TensorRT engine cache."""
from __future__ import annotations

import os
import time


def cmd_cache(args) -> int:
    from ..backends import engine_cache
    from ..report import format_table
    cache = engine_cache.EngineCache(args.dir or engine_cache.default_dir())
    if args.action == "clear":
        count, size = cache.clear()
        print(f"removed {count} engines ({size / 2**20:.1f} MiB) from {cache.directory}")
        return 0
    entries = cache.entries()
    total = sum(e[1] for e in entries)
    print(f"{cache.directory}: {len(entries)} engines, {total / 2**20:.1f} MiB "
          f"(limit {cache.max_bytes / 2**30:.1f} GiB)")
    if entries:
        rows = [("engine", "MiB", "last used")] + [
            (os.path.basename(path), f"{size / 2**20:.1f}", time.strftime("%Y-%m-%d %H:%M", time.localtime(used)))
            for path, size, used in entries]
        print(format_table(rows))
    return 0
