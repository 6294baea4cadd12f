"""``python -m service`` = the ``safl`` command."""

from .cli import main

raise SystemExit(main())
