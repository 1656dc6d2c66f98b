"""One module per command; each defines ``register(app)``."""

from adaptedit.commands import (compare_cmd, eval_cmd, export_cmd, extract_cmd, init_cmd,
                                inspect_cmd, merge_cmd, modules_cmd, train_cmd)

COMMANDS = [modules_cmd, init_cmd, train_cmd, inspect_cmd, merge_cmd, export_cmd, extract_cmd,
            eval_cmd, compare_cmd]
