"""Floor 0: helpers every other floor may use (device, seeding, atomic IO, errors, progress)."""
from lmstack.utils.errors import LmstackError
from lmstack.utils.io import atomic_write_bytes, atomic_write_text, atomic_write_json, atomic_dir
from lmstack.utils.device import pick_device, pick_dtype, autocast
from lmstack.utils.seed import seed_everything
from lmstack.utils.progress import progress

__all__ = [
    "LmstackError", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_dir",
    "pick_device", "pick_dtype", "autocast", "seed_everything", "progress",
]
