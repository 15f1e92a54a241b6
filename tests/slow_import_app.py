"""tests.apps' handler behind an import that takes 3 s (the hang check counts silence from the first
heartbeat, not from the start of the process)."""
import time

from tests import apps

time.sleep(3)
handle = apps.handle
