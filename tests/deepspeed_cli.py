"""The CLI as `tests/test_deepspeed.py` launches it: without DeepSpeed's shared-memory all-reduce kernel,
which DeepSpeed compiles at the first start in each virtual environment on a CPU (half a minute, longer
beside the rest of the suite); gloo all-reduces the same tensors."""

import importlib
import sys

# the module itself: the package's `deepspeed.comm.torch` attribute is torch, re-exported by `deepspeed.comm`
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

from mmalign.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
