"""``python -m brainhpc.gpu_check``: see the package docstring."""

import sys

from brainhpc.gpu_check import main

sys.exit(main())
