"""torchrun's target in tests/test_ddp.py: the wsi-pipeline command line, with the BatchNorm-free test
models registered and, when ``WSI_TEST_CRASH_AT=k:step:n`` is set, a crash at that checkpoint of em-round.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_driver.py em-round ...
    python tests/ddp_driver.py em-round ...          # the same in one process
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.ddp_helpers import install_crash, register_test_models  # noqa: E402

register_test_models()
install_crash(os.environ.get("WSI_TEST_CRASH_AT"))

from pipeline.cli import main  # noqa: E402

main(prog_name="wsi-pipeline")
