"""``python -m brainhpc.sweep``: the same command as ``brainhpc sweep``."""

import sys

from brainhpc.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
