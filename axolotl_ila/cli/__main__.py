"""``python -m axolotl_ila.cli``: the same as ``axolotl-ila``."""

from axolotl_ila.cli.commands import main

raise SystemExit(main())
