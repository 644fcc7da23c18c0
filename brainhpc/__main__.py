"""``python -m brainhpc ...`` is the same as the ``brainhpc`` console script."""

from brainhpc.cli import main

raise SystemExit(main())
