import os

os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
