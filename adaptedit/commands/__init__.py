"""One module per command; each defines ``register(app)``."""

import importlib

_NAMES = ["modules_cmd", "init_cmd", "train_cmd", "inspect_cmd", "merge_cmd"]
COMMANDS = []
for _name in _NAMES:
    try:
        COMMANDS.append(importlib.import_module(f"adaptedit.commands.{_name}"))
    except ModuleNotFoundError as _e:  # a command module not written yet
        if _e.name != f"adaptedit.commands.{_name}":
            raise
