"""The run lock: a lock file left by another user's finished run is locked read-only, not a PermissionError.
A lock held by another process refuses the run before anything is touched: write/test_claim.py."""

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from open_instruct_ckpt._write.lock import LOCK_NAME

AS_NOBODY = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from open_instruct_ckpt._write.lock import RunLock
    os.setgid(65534); os.setuid(65534)  # another user than the one who left the lock file
    lock = RunLock(Path(sys.argv[1]))
    lock.acquire()
    print("locked", lock.held)
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")
def test_lock_file_of_another_user_is_locked_through_a_read_only_descriptor():
    output_dir = Path(tempfile.mkdtemp(prefix="lock-"))
    try:
        output_dir.chmod(0o755)
        lock_file = output_dir / LOCK_NAME
        lock_file.write_text("4242")  # left by root's finished run
        lock_file.chmod(0o644)
        done = subprocess.run([sys.executable, "-c", AS_NOBODY, str(output_dir)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["locked", "True"]
        assert lock_file.stat().st_uid == 0  # still root's file, opened read-only
    finally:
        subprocess.run(["rm", "-rf", str(output_dir)])
