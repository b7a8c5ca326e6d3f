"""A child module for the fork server's tests: `main()` reads sys.argv as `python -m` would give it.

forked_child exit CODE        exit with CODE
forked_child sleep SECONDS    sleep (a child to signal), then exit 0
forked_child env NAME FILE    write os.environ[NAME], os.getcwd() and the session id to FILE
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    action = sys.argv[1]
    if action == "exit":
        sys.exit(int(sys.argv[2]))
    if action == "sleep":
        time.sleep(float(sys.argv[2]))
        return
    if action == "env":
        with open(sys.argv[3], "w") as f:
            json.dump({"value": os.environ.get(sys.argv[2]), "cwd": os.getcwd(), "sid": os.getsid(0)}, f)
